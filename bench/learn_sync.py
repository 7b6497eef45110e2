"""Proof that training learns lip sync: tiny EMO, stages 1 and 2, on the synthetic talking-face set, on a CPU.

    python bench/learn_sync.py [--minutes 15] [--out /tmp/learn_sync]

1. writes a synthetic set (procedural faces whose mouth follows espeak-ng speech; emo_stream.training.synthetic)
2. stage 1 (image pretraining; the tiny preset's random VAE is fitted first), then stage 2 (video + audio),
   within the time budget (train.max_minutes)
3. generates from held-out speech (new random phrases, never trained on) with the EMO backend, and measures
   the mouth opening of every generated frame (dark area in the known mouth region of the synthetic layout)
4. prints JSON: Pearson r between generated mouth opening and the audio envelope, for the untrained preset,
   the stage-1-only model and the trained (stage 2) model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _common import (  # bench/; puts the repo on sys.path
    emit_json, loss_summary, save_contact_sheet, shared_cpu_device, start_learning_run)
from emo_stream.training.config import config_from_dict
from emo_stream.training.synthetic import (generate_dataset, identity_reference, mouth_darkness,
                                           random_speech, speech_envelope)
from emo_stream.training.train import train


STAGE2_TRAINABLE = ["temporal", "audio", "backbone"]


def stage1_config(data: Path, out: Path, minutes: float, seed: int, vae_steps: int = 250, init: str = "tiny",
                  source: str = "learn_sync stage 1"):
    """The recipe's stage 1: image pretraining from `init` (the tiny preset's random VAE fitted first)."""
    return config_from_dict({"stage": 1, "data": {"root": str(data)},
                             "model": {"init": init, "options": {"seed": seed}},
                             "train": {"output_dir": str(out), "max_steps": 2000, "batch_size": 8, "lr": 1e-3,
                                       "vae_steps": vae_steps, "checkpoint_every": 500, "log_every": 10,
                                       "max_minutes": minutes, "seed": seed}}, source=source)


def stage2_config(data: Path, out: Path, init: str, minutes: float, seed: int, motion_noise: float = 0.3,
                  motion_drop: float = 0.3, source: str = "learn_sync stage 2"):
    """The recipe's stage 2: video + audio from the stage-1 model `init`."""
    return config_from_dict({"stage": 2, "data": {"root": str(data), "motion_drop": motion_drop},
                             "model": {"init": init},
                             "train": {"output_dir": str(out), "max_steps": 100000, "batch_size": 4, "lr": 1e-3,
                                       "trainable": STAGE2_TRAINABLE, "cond_drop": 0.1, "motion_noise": motion_noise,
                                       "checkpoint_every": 100000, "log_every": 10, "max_minutes": minutes,
                                       "seed": seed}}, source=source)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) < 1e-9 or np.std(b) < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def evaluate(model_spec: str, size: int, audio: np.ndarray, steps: int, identities: int, seed: int) -> dict:
    """Generate each identity speaking `audio`; r between generated mouth opening and the envelope."""
    from emo_stream.families.emo.backend import EmoBackend, load_model
    from emo_stream.generate import iter_segments

    model = load_model(model_spec, seed=seed)
    backend = EmoBackend(model, size=size, fps=25, steps=steps)
    env = None
    rs, frames_all = [], []
    for ident in range(identities):
        image, box = identity_reference(size, seed=seed, index=ident)
        avatar = backend.avatar_from_crop(image, box)
        frames = np.concatenate([f for f, _ in iter_segments(backend, avatar, audio, seed=ident)])
        env = speech_envelope(audio, len(frames))
        rs.append(pearson(mouth_darkness(frames), env))
        frames_all.append(frames)
    return {"r": round(float(np.mean(rs)), 3), "r_per_identity": [round(r, 3) for r in rs],
            "frames": int(len(frames_all[0])), "_frames": frames_all}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=15.0, help="total budget (data, training, evaluation)")
    p.add_argument("--out", default="/tmp/emo_learn_sync")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--identities", type=int, default=4)
    p.add_argument("--eval-identities", type=int, default=2, help="identities generated at evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--eval-seconds", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--motion-noise", type=float, default=0.3, help="stage 2 train.motion_noise")
    p.add_argument("--motion-drop", type=float, default=0.3, help="stage 2 data.motion_drop")
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    t_start = start_learning_run(args.threads)
    out = Path(args.out)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"
    generate_dataset(data, clips=args.clips, size=args.size, seconds=4.0, identities=args.identities, seed=args.seed)
    t_data = time.monotonic() - t_start

    eval_reserve = 2.0  # minutes kept for generation and measurement
    budget = args.minutes - t_data / 60 - eval_reserve
    s1_minutes = max(0.5, budget * 0.18)
    cfg1 = stage1_config(data, out / "stage1", s1_minutes, args.seed, vae_steps=args.vae_steps)
    t1 = time.monotonic()
    r1 = train(cfg1, resume=None, progress=False)
    t_s1 = time.monotonic() - t1
    s2_minutes = max(0.5, args.minutes - (time.monotonic() - t_start) / 60 - eval_reserve)
    cfg2 = stage2_config(data, out / "stage2", r1["final"], s2_minutes, args.seed, motion_noise=args.motion_noise,
                         motion_drop=args.motion_drop)
    t2 = time.monotonic()
    r2 = train(cfg2, resume=None, progress=False)
    t_s2 = time.monotonic() - t2

    # held-out speech: phrases drawn with another seed, never seen in training
    audio = random_speech(np.random.default_rng([args.seed, 999]), args.eval_seconds)
    t3 = time.monotonic()
    res = {name: evaluate(spec, args.size, audio, args.sample_steps, min(args.eval_identities, args.identities),
                         args.seed)
           for name, spec in (("untrained", "tiny"), ("stage1_only", r1["final"]), ("trained", r2["final"]))}
    t_eval = time.monotonic() - t3
    # a contact sheet of the trained model's first identity, next to the JSON
    save_contact_sheet(out / "trained_frames.png", [res["trained"]["_frames"][0][::6][:12]])
    for v in res.values():
        v.pop("_frames")

    def stage_summary(r: dict) -> dict:
        return {"steps": r["steps"], **loss_summary(r["losses"]), "minutes": round(r["seconds"] / 60, 2)}

    result = {
        "bench": "learn_sync",
        "device": shared_cpu_device(args.threads),
        "torch": torch.__version__,
        "size": args.size, "clips": args.clips, "identities": args.identities,
        "stage2_options": {"motion_noise": args.motion_noise, "motion_drop": args.motion_drop,
                           "trainable": STAGE2_TRAINABLE, "batch_size": 4, "lr": 1e-3},
        "eval": {"speech_seconds": args.eval_seconds, "held_out": True, "sampling_steps": args.sample_steps,
                 "measure": "Pearson r, mouth darkness in the synthetic mouth region vs per-frame RMS envelope"},
        "r_untrained": res["untrained"]["r"], "r_stage1_only": res["stage1_only"]["r"], "r_trained": res["trained"]["r"],
        "detail": res,
        "stage1": stage_summary(r1), "stage2": stage_summary(r2),
        "minutes": {"data": round(t_data / 60, 2), "stage1_incl_vae_fit": round(t_s1 / 60, 2),
                    "stage2": round(t_s2 / 60, 2), "eval": round(t_eval / 60, 2),
                    "total": round((time.monotonic() - t_start) / 60, 2)},
        "target": "r_trained >= 0.5, r_untrained ~ 0, total <= 15 minutes",
    }
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
