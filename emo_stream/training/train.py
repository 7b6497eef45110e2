"""`emo-stream train --stage 1|2|3|distill --config FILE`: EMO's three training stages with accelerate, and
the distillation of a trained model into a few-step guidance-free live student (training/distill.py).

One command for every scale: plain `emo-stream train ...` runs on one device; the same command under
`accelerate launch [--multi_gpu --num_machines ...] -m server.cli train ...` runs data-parallel on many
GPUs and machines (accelerate gives every process its rank; each takes its own slice of every global
batch, see data.StepSampler).

Resuming is exact: a checkpoint holds the model, optimiser, LR schedule, EMA and the step counter, and
the batch and the noise of every step are pure functions of (seed, step, rank), so a resumed run
replays what an uninterrupted one would have done.

Output folder:
    checkpoints/step-000500/   accelerate state (model, optimiser, scheduler, EMA) + trainer.json
    final/                     the trained model (EmoModel.save_pretrained; EMA weights when EMA is on):
                               `emo-stream generate --backend emo --model OUT/final`
    loss.csv                   step, loss, lr, seconds (TensorBoard too with train.tensorboard)
    samples/step-000500.mp4    periodic sample videos (train.sample_every)
    config.yaml                the resolved training config
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from emo_stream.errors import ConfigError, EmoStreamError, OutputError
from emo_stream.training.config import TrainConfig, load_train_config

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The RNG for one micro-step's noise, timesteps and condition dropout: a function of (seed, step, rank)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank, 11]).generate_state(1)[0]))
    return g


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / "trainer.json").is_file()]  # a crash mid-save leaves no trainer.json
    return ckpts[-1] if ckpts else None


class Trainer:
    """Owns the accelerator, model, optimiser, data and the loop. `run()` trains to max_steps."""

    def __init__(self, cfg: TrainConfig, resume: str | None = "auto", progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        from emo_stream.training import model_adapter as ma
        from emo_stream.training.data import EmoDataset, StepSampler

        self.cfg = cfg
        t = cfg.train
        self.out = Path(t.output_dir)
        self.progress = progress
        if t.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"{cfg.source}: train.device must be cpu or cuda (got {t.device!r}); pick GPUs "
                              f"with CUDA_VISIBLE_DEVICES or accelerate launch")
        if t.device == "cuda" and not torch.cuda.is_available():
            # not a silent fall-back to the CPU: that would be days instead of hours
            raise ConfigError(f"{cfg.source}: train.device is cuda, but CUDA is not available here "
                              f"(a CPU build of torch?); set train.device: cpu to train on the CPU")
        cpu = t.device == "cpu" or not torch.cuda.is_available()
        log_with = "tensorboard" if t.tensorboard else None
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, cpu=cpu,
            log_with=log_with, project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                   logging_dir=str(self.out / "tb")),
            # the ReferenceNet's last layers feed nothing (only its inner features are read), and stage 1
            # has no audio: some trainable parameters get no gradient in some stages
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters="referencenet" in cfg.trainable or cfg.stage == 1)])
        acc = self.accelerator
        if acc.is_main_process:
            try:  # now, not after minutes of model loading
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot write train.output_dir {self.out}: "
                                  f"{exc.strerror or exc.__class__.__name__}") from None
        torch.manual_seed(t.seed)

        self.distill_info = None
        if cfg.stage == "distill":
            from emo_stream.training import distill

            self.model, distill_module, self.distill_info = distill.build(cfg, device=acc.device)
        else:
            self.model = ma.load_model(cfg.model.init, cfg.model.options)
        mcfg = self.model.config
        self.f = cfg.data.clip_frames or mcfg.clip_frames
        self.n = cfg.data.motion_frames or mcfg.motion_frames
        from emo_stream.training.dataset_layout import read_info

        for root in cfg.data.root:
            if not Path(root).is_dir():
                raise ConfigError(f"dataset folder not found: {root} (data.root in {cfg.source})")
        self.size = ma.model_size(self.model, cfg.data.size or read_info(Path(cfg.data.root[0])).size)
        trainable = self.model.set_trainable(cfg.trainable)
        if not trainable:
            raise ConfigError(f"{cfg.source}: nothing to train: groups {cfg.trainable} have no parameters")
        self.trainable_groups = sorted(cfg.trainable)
        if t.gradient_checkpointing:
            ma.enable_gradient_checkpointing(self.model)
        if cfg.stage == "distill":
            self.module = distill_module
        else:
            self.module = ma.TrainingModule(self.model, stage=cfg.stage, motion_noise=t.motion_noise)
        params = [p for p in self.model.parameters() if p.requires_grad]
        log.info("stage %s: training %s (%.2fM parameters)", cfg.stage, ", ".join(cfg.trainable),
                 sum(p.numel() for p in params) / 1e6)
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        warm = t.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warm * acc.num_processes)) if warm else 1.0)
        self.ema = None
        if t.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=t.ema_decay)

        left, right = ma.audio_context_frames(self.model)
        self.dataset = EmoDataset(cfg.data.root, self.size, mode="image" if cfg.stage == 1 else "video",
                                  clip_frames=self.f, motion_frames=self.n, audio_left_frames=left,
                                  audio_right_frames=right, motion_drop=cfg.data.motion_drop,
                                  cache=cfg.data.cache_clips)
        self._StepSampler = StepSampler

        self.module, self.optimizer, self.scheduler = acc.prepare(self.module, self.optimizer, self.scheduler)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)

        self.step = 0        # optimiser steps done
        self.micro = 0       # batches consumed (the data position)
        if resume:
            ckpt = latest_checkpoint(self.out) if resume == "auto" else Path(resume)
            if resume != "auto" and (ckpt is None or not (ckpt / "trainer.json").is_file()):
                raise ConfigError(f"no checkpoint to resume from at {resume}")
            if ckpt is not None:
                self._load(ckpt)
        if self.step == 0 and t.vae_steps:  # a resumed run has the fitted VAE in its checkpoint already
            from emo_stream.families.emo.config import PRESETS

            if cfg.model.init in PRESETS:
                self._fit_vae()
            else:
                # earlier stages were trained in this VAE's latent space: refitting it would undo them
                log.warning("train.vae_steps ignored: model.init %s is not a random-weight preset", cfg.model.init)

    def _fit_vae(self) -> None:
        from emo_stream.training.vae_fit import fit_vae

        model, t = self.model, self.cfg.train
        fit_vae(model.vae, self.dataset.store, self.size, t.vae_steps, batch_size=t.vae_batch_size, seed=t.seed,
                device=self.accelerator.device, progress=self.progress and self.accelerator.is_local_main_process)
        # SD's convention: scaled latents have unit variance; measure it on the data
        with torch.no_grad():
            from emo_stream.training.data import _to_tensor

            clip = self.dataset.store.load(self.dataset.usable[0])
            x = _to_tensor(clip.frames[:32], self.size).to(self.accelerator.device)
            std = float(model.vae.encode(x).latent_dist.mode().std())
        scale = round(1.0 / max(std, 1e-3), 5)
        model.vae.register_to_config(scaling_factor=scale)
        model.config.vae["scaling_factor"] = scale
        log.info("VAE fitted; latent scaling factor %.4f", scale)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _load(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "trainer.json").read_text())
        if state.get("stage") != self.cfg.stage:
            raise ConfigError(f"checkpoint {ckpt} is from stage {state.get('stage')}, not stage {self.cfg.stage}: "
                              f"use another train.output_dir (and model.init: {self.out / FINAL} to start "
                              f"the next stage from this one)")
        if state.get("trainable") != self.trainable_groups:
            raise ConfigError(f"checkpoint {ckpt} trained other parameter groups; use another output_dir")
        self.accelerator.load_state(str(ckpt))
        self.step, self.micro = int(state["step"]), int(state["micro_step"])
        if "vae_scaling_factor" in state:  # lives in the config, not the weights (see _fit_vae)
            self.model.vae.register_to_config(scaling_factor=state["vae_scaling_factor"])
            self.model.config.vae["scaling_factor"] = state["vae_scaling_factor"]
        log.info("resumed from %s at step %d", ckpt, self.step)

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        ckpt = self.out / CHECKPOINTS / f"step-{self.step:06d}"
        acc.wait_for_everyone()
        acc.save_state(str(ckpt))
        if acc.is_main_process:
            (ckpt / "trainer.json").write_text(json.dumps(
                {"step": self.step, "micro_step": self.micro, "stage": self.cfg.stage,
                 "trainable": self.trainable_groups, "processes": acc.num_processes,
                 "vae_scaling_factor": float(self.model.vae.config.scaling_factor)}, indent=2))
            old = sorted((self.out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for stale in old[:-self.cfg.train.keep_checkpoints]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return ckpt

    def save_final(self) -> Path:
        """The trained model as a plain EMO checkpoint folder (EMA weights if EMA is on)."""
        from emo_stream.training import model_adapter as ma

        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / FINAL
        if acc.is_main_process:
            model = acc.unwrap_model(self.module).model
            if self.ema is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                self.ema.store(params)
                self.ema.copy_to(params)
            training = {"stage": self.cfg.stage, "steps": self.step, "config": self.cfg.to_dict()}
            if self.distill_info is not None:
                training["distilled"] = self.distill_info
            ma.save_model(model, final, training=training)
            if self.ema is not None:
                self.ema.restore(params)
        acc.wait_for_everyone()
        return final

    # ---- the loop ------------------------------------------------------------------------------
    def _loader(self):
        acc = self.accelerator
        total_micro = self.cfg.train.max_steps * self.cfg.train.grad_accum
        sampler = self._StepSampler(len(self.dataset), self.cfg.train.batch_size, seed=self.cfg.train.seed,
                                    start=self.micro, rank=acc.process_index, world=acc.num_processes,
                                    stop=total_micro)
        nw = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=nw,
                                           pin_memory=acc.device.type == "cuda", persistent_workers=False,
                                           prefetch_factor=2 if nw else None)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One micro-batch forward/backward (and an optimiser step at the end of an accumulation)."""
        acc = self.accelerator
        gen = step_generator(self.cfg.train.seed, self.micro, acc.process_index)
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
        with acc.accumulate(self.module):
            with acc.autocast():
                loss = self.module(batch, generator=gen, cond_drop=self.cfg.train.cond_drop)
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.train.max_grad_norm:
                acc.clip_grad_norm_(self.module.parameters(), self.cfg.train.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        return float(loss.detach())

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        acc, t = self.accelerator, self.cfg.train
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if t.tensorboard:
            acc.init_trackers("emo", config={"stage": self.cfg.stage, "lr": t.lr, "batch_size": t.batch_size})
        csv_path = self.out / "loss.csv"
        new_csv = not csv_path.is_file() or self.step == 0
        if not new_csv and acc.is_main_process:
            # rows logged after the checkpoint we resumed from are about to be redone: drop them
            rows = csv_path.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= self.step]
            csv_path.write_text("\n".join(kept) + "\n")
        csv_file = open(csv_path, "w" if new_csv else "a", newline="") if acc.is_main_process else None
        writer = csv.writer(csv_file) if csv_file else None
        if writer and new_csv:
            writer.writerow(["step", "loss", "lr", "seconds"])
        losses: list[float] = []
        window: list[float] = []
        t0 = time.monotonic()
        bar = tqdm(total=t.max_steps, initial=self.step, unit="step", desc=f"stage {self.cfg.stage}",
                   disable=not (self.progress and acc.is_local_main_process))
        self.module.train()
        try:
            for batch in self._loader():
                loss = self.train_step(batch)
                window.append(loss)
                if not acc.sync_gradients:
                    continue
                self.step += 1
                if self.ema is not None:
                    self.ema.step([p for p in acc.unwrap_model(self.module).model.parameters() if p.requires_grad])
                mean = float(np.mean(window))
                window = []
                log_now = self.step % t.log_every == 0 or self.step == t.max_steps
                if log_now and acc.num_processes > 1:  # every process reaches this step: average their losses
                    mean = float(acc.reduce(torch.tensor(mean, device=acc.device), reduction="mean"))
                losses.append(mean)
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4f}")
                if not math.isfinite(mean):
                    raise EmoStreamError(f"loss is {mean} at step {self.step}: lower train.lr or use bf16/fp32")
                if writer and log_now:
                    lr = self.scheduler.get_last_lr()[0]
                    writer.writerow([self.step, f"{mean:.6f}", f"{lr:.3e}", f"{time.monotonic() - t0:.1f}"])
                    csv_file.flush()
                    if t.tensorboard:
                        acc.log({"loss": mean, "lr": lr}, step=self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self.save_checkpoint()
                if t.sample_every and self.step % t.sample_every == 0:
                    self.sample_video()
                if t.max_minutes and time.monotonic() - t0 > t.max_minutes * 60 and self.step < t.max_steps:
                    log.info("train.max_minutes reached at step %d: checkpointing and stopping", self.step)
                    if self.step % t.checkpoint_every:
                        self.save_checkpoint()
                    break
        finally:
            bar.close()
            if csv_file:
                csv_file.close()
        final = self.save_final()
        if t.tensorboard:
            acc.end_training()
        return {"stage": self.cfg.stage, "steps": self.step, "final": str(final), "losses": losses,
                "seconds": round(time.monotonic() - t0, 1)}

    # ---- samples -------------------------------------------------------------------------------
    def sample_video(self) -> Path | None:
        """Render a short sample with the current weights (main process only)."""
        from emo_stream.training import model_adapter as ma

        acc = self.accelerator
        if not acc.is_main_process:
            return None
        out = self.out / "samples" / f"step-{self.step:06d}.mp4"
        module = acc.unwrap_model(self.module)
        image, audio, box = self._sample_inputs()
        module.eval()
        try:
            ma.render_sample(module.model, image, audio, out, size=self.size, steps=self.cfg.train.sample_steps,
                             face_box=box)
        except EmoStreamError as exc:
            log.warning("sample at step %d failed: %s", self.step, exc)
            return None
        finally:
            module.train()
        log.info("sample: %s", out)
        return out

    def _sample_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(image, audio, face box or None): the configured files, else the first clip's first frame and audio."""
        from PIL import Image

        from emo_stream.media import load_audio, load_image

        t = self.cfg.train
        clip = self.dataset.store.load(self.dataset.usable[0])
        image, box = clip.frames[0], clip.boxes[0] * (self.size / clip.frames.shape[1])
        if image.shape[0] != self.size:
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
        if t.sample_image:
            image, box = load_image(t.sample_image), None
        audio = load_audio(t.sample_audio) if t.sample_audio else clip.audio
        return image, audio[: 16000 * 4], box


def train(cfg: TrainConfig, resume: str | None = "auto", progress: bool = True) -> dict[str, Any]:
    """Train one stage to cfg.train.max_steps (resuming from the latest checkpoint by default)."""
    return Trainer(cfg, resume=resume, progress=progress).run()


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=["1", "2", "3", "distill"], required=True,
                   help="1 image pretraining, 2 video (temporal + audio), 3 temporal + speed, distill: a trained "
                        "model (distill.teacher) -> a few-step guidance-free live student")
    p.add_argument("--config", required=True, help="training YAML (see configs/train/)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (latest checkpoint in output_dir, if any), a checkpoint folder, or 'no'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v)
    cfg = load_train_config(args.config, overrides)
    args.stage = int(args.stage) if args.stage.isdigit() else args.stage
    if cfg.stage != args.stage:
        if "stage" in yaml.safe_load(Path(args.config).read_text() or "{}"):
            raise ConfigError(f"--stage {args.stage} but {args.config} is a stage {cfg.stage} config")
        cfg.stage = args.stage
        cfg.validate()
    resume = None if args.resume in ("no", "none", "") else args.resume
    summary = train(cfg, resume=resume, progress=not args.no_progress)
    log.info("stage %s done after %d steps; model in %s", summary["stage"], summary["steps"], summary["final"])
    return 0
