"""Training configuration: configs/train/*.yaml -> validated dataclasses (errors name the bad key).

    stage: 1                    # 1 image pretraining, 2 video, 3 speed layers (CLI --stage must agree)
    model:
      init: tiny                # preset (tiny, sd15), model YAML, or a checkpoint folder (e.g. stage 1 output)
    data:
      root: data/synth          # a prepared dataset folder (or a list of them)
    train:
      output_dir: runs/tiny_stage1
      max_steps: 2000
      ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_stream.config_io import build_dataclass, check_keys, read_yaml
from emo_stream.errors import ConfigError

# Parameter groups each stage trains by default (paper, section 3.2/4.1). Names are the model's groups
# (see model_adapter.PARAM_GROUPS).
STAGE_TRAINABLE = {
    1: ["referencenet", "backbone", "face_locator"],
    2: ["temporal", "audio"],
    3: ["temporal", "speed"],
    # distillation (training/distill.py): the whole student but its ReferenceNet (frozen unless it is pruned)
    "distill": ["backbone", "temporal", "audio", "speed", "face_locator"],
}
STAGES = (1, 2, 3, "distill")


@dataclass
class DistillSection:
    """`stage: distill` only: the teacher and the student's sampler (see emo_stream/training/distill.py)."""

    teacher: str | None = None             # checkpoint folder (ours) or preset; the student starts from it
    steps: int = 4                         # the student's DDIM steps (2-4 for live)
    teacher_steps: int = 40                # the teacher's guided DDIM steps it learns to match
    guidance: float | None = None          # the teacher's guidance scale (default: its config's)
    student_layers_per_block: int | None = None  # fewer layers per UNet level (BK-SDM); None: the teacher's


@dataclass
class ModelSection:
    init: str = "tiny"                    # preset, model YAML, or emo-stream checkpoint folder
    options: dict[str, Any] = field(default_factory=dict)  # passed to EmoModel.from_pretrained / from_config


@dataclass
class DataSection:
    root: list[str] = field(default_factory=list)  # prepared dataset folders
    size: int | None = None               # training resolution (default: the dataset's; frames are resized)
    clip_frames: int | None = None        # f (default: the model's)
    motion_frames: int | None = None      # n (default: the model's)
    num_workers: int = 0                  # DataLoader worker processes
    cache_clips: int = 32                 # decoded clips kept in memory per worker
    motion_drop: float = 0.1              # share of stage-2/3 samples with no motion frames (first segment)


@dataclass
class TrainSection:
    output_dir: str = "runs/emo"
    max_steps: int = 1000                 # optimiser steps
    max_minutes: float | None = None      # stop (with a checkpoint; resumable) after this much wall time
    batch_size: int = 1                   # per process
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    mixed_precision: str = "no"           # no | fp16 | bf16
    gradient_checkpointing: bool = False
    ema_decay: float | None = None        # e.g. 0.9999; the EMA weights are what the final checkpoint holds
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0                 # 0: no periodic samples
    sample_image: str | None = None       # default: a reference frame of the first clip
    sample_audio: str | None = None       # default: that clip's audio
    sample_steps: int | None = None
    tensorboard: bool = False
    vae_steps: int = 0                    # fit the VAE first (only for models whose VAE is random: tiny)
    vae_batch_size: int = 16
    trainable: list[str] | None = None    # override the stage's parameter groups
    cond_drop: float = 0.05               # drop audio conditioning, for classifier-free guidance
    motion_noise: float = 0.0             # std of noise added to motion-frame latents: at inference the motion
                                          # frames are the model's own (imperfect) output, so errors do not pile up
    device: str | None = None             # only without accelerate launch; default cuda if available


@dataclass
class TrainConfig:
    stage: int | str = 1
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    source: str = "<dict>"

    @property
    def trainable(self) -> list[str]:
        if self.train.trainable:
            return list(self.train.trainable)
        groups = list(STAGE_TRAINABLE[self.stage])
        if self.stage == "distill" and self.distill.student_layers_per_block is not None:
            groups.append("referencenet")  # a pruned ReferenceNet must learn to feed the pruned backbone
        return groups

    def validate(self) -> "TrainConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{self.source}: {msg}")

        t, d = self.train, self.data
        if isinstance(self.stage, str) and self.stage.isdigit():
            self.stage = int(self.stage)
        need(self.stage in STAGES, f"stage must be 1, 2, 3 or distill (got {self.stage})")
        if self.stage == "distill":
            dd = self.distill
            need(bool(dd.teacher), "distill.teacher is missing: the teacher checkpoint folder (or a preset)")
            need(1 <= dd.steps <= 8, f"distill.steps must be in 1..8 (got {dd.steps})")
            need(dd.teacher_steps >= dd.steps and dd.teacher_steps % dd.steps == 0,
                 f"distill.teacher_steps ({dd.teacher_steps}) must be a multiple of distill.steps ({dd.steps})")
            need(dd.guidance is None or dd.guidance >= 1, "distill.guidance must be >= 1 (1: no guidance)")
            need(dd.student_layers_per_block is None or dd.student_layers_per_block >= 1,
                 "distill.student_layers_per_block must be >= 1")
            need(t.vae_steps == 0, "train.vae_steps must be 0 for distill: the student keeps the teacher's VAE")
            self.model.init = str(dd.teacher)  # the student starts from the teacher
        need(bool(d.root), "data.root is missing: the folder made by `emo-stream prepare` (or the synthetic generator)")
        need(t.max_steps >= 1, "train.max_steps must be >= 1")
        need(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
        need(t.lr > 0, "train.lr must be > 0")
        need(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
        need(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay must be in (0, 1) or null")
        need(t.checkpoint_every >= 1 and t.keep_checkpoints >= 1, "checkpoint_every/keep_checkpoints must be >= 1")
        need(t.vae_steps >= 0 and t.vae_batch_size >= 1, "train.vae_steps >= 0, train.vae_batch_size >= 1")
        need(t.log_every >= 1 and t.sample_every >= 0, "log_every must be >= 1, sample_every >= 0")
        need(t.motion_noise >= 0, "train.motion_noise must be >= 0")
        need(0 <= t.cond_drop < 1 and 0 <= d.motion_drop <= 1, "cond_drop and motion_drop must be in [0, 1)")
        need(d.clip_frames is None or d.clip_frames >= 1, "data.clip_frames must be >= 1")
        need(d.motion_frames is None or d.motion_frames >= 1, "data.motion_frames must be >= 1")
        need(d.size is None or d.size >= 16, "data.size must be >= 16")
        need(d.num_workers >= 0 and d.cache_clips >= 1, "data.num_workers >= 0, data.cache_clips >= 1")
        from emo_stream.training.model_adapter import PARAM_GROUPS

        bad = sorted(set(self.trainable) - set(PARAM_GROUPS))
        need(not bad, f"unknown trainable groups {bad}; known: {', '.join(PARAM_GROUPS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> TrainConfig:
    """Build a TrainConfig; relative paths in data.root / model.init / output_dir stay relative to the
    working directory (like every CLI path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    check_keys(data, ("stage", "model", "data", "train", "distill"), source)  # `source` is ours, not a YAML key
    data = dict(data)
    section = data.get("data")
    if isinstance(section, dict) and "root" in section:
        roots = section["root"]  # one folder or a list of them
        data["data"] = {**section, "root": [str(r) for r in (roots if isinstance(roots, list) else [roots])]}
    config = build_dataclass(TrainConfig, data, source)
    config.source = source
    return config.validate()


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML; `overrides` are dotted keys (e.g. {"train.max_steps": 10, "stage": 2})."""
    data = read_yaml(path, "training config")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: cannot override {dotted}: {p} is not a section")
        node[leaf] = value
    return config_from_dict(data, source=str(path))
