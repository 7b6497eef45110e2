"""Proof that `train --stage distill` works: tiny EMO on the synthetic talking-face set, on a CPU.

    python bench/learn_distill.py --teacher DIR --data DIR [--minutes 10] [--json bench/results/learn_distill-cpu.json]
    python bench/learn_distill.py [--teacher-minutes 14]     # trains its own teacher first (learn_sync's recipe)

1. a teacher: a trained tiny stage-2 model (--teacher), or stages 1 and 2 trained here as bench/learn_sync.py does
2. distills it (40 guided DDIM steps, the tiny preset's guidance 2.0) into a 4-step guidance-free student
3. renders held-out speech (phrases never trained on) with: the teacher at 40 guided steps (the reference),
   the teacher at 4 guided steps, and the student at 4 steps without guidance; same seeds, same avatars
4. prints JSON: each 4-step render's distance to the 40-step reference (mean absolute pixel error, PSNR) and
   every render's lip-sync r (as bench/learn_sync.py measures it)
Target: student closer to the reference than the teacher's own 4 steps, student r >= 0.5.
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
from emo_stream.training.synthetic import (generate_dataset, identity_reference, mouth_darkness, random_speech,
                                           speech_envelope)
from emo_stream.training.train import train
from learn_sync import pearson, stage1_config, stage2_config  # bench/: the teacher's recipe and lip-sync measure


def render(model_dir: str, size: int, audio: np.ndarray, steps: int, guidance: float | None, identities: int,
           seed: int) -> list[np.ndarray]:
    from emo_stream.families.emo.backend import EmoBackend, load_model
    from emo_stream.generate import iter_segments

    backend = EmoBackend(load_model(model_dir, seed=seed), size=size, fps=25, steps=steps, guidance=guidance,
                         decoder="vae")
    out = []
    for ident in range(identities):
        image, box = identity_reference(size, seed=seed, index=ident)
        avatar = backend.avatar_from_crop(image, box)
        # 8-frame segments: the live segment length the student was distilled on
        out.append(np.concatenate([f for f, _ in iter_segments(backend, avatar, audio, seed=ident, clip_frames=8)]))
    return out


def compare(frames: list[np.ndarray], reference: list[np.ndarray], audio: np.ndarray) -> dict:
    mae = [float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()) for a, b in zip(frames, reference)]
    mse = [float(np.square(a.astype(np.float32) - b.astype(np.float32)).mean()) for a, b in zip(frames, reference)]
    rs = [pearson(mouth_darkness(f), speech_envelope(audio, len(f))) for f in frames]
    return {"mae_to_reference": round(float(np.mean(mae)), 3),
            "psnr_to_reference": round(float(np.mean([10 * np.log10(255 ** 2 / max(m, 1e-6)) for m in mse])), 2),
            "r": round(float(np.mean(rs)), 3), "r_per_identity": [round(r, 3) for r in rs]}


def train_teacher(data: Path, out: Path, minutes: float, seed: int, stage1: str | None) -> str:
    """learn_sync's recipe: stage 1 (with the random VAE fitted first), then stage 2."""
    t0 = time.monotonic()
    # stage 1 from the preset (its random VAE fitted first), or continued from a given stage-1 model
    cfg1 = stage1_config(data, out / "stage1", max(0.5, minutes * 0.25), seed, vae_steps=0 if stage1 else 250,
                         init=stage1 or "tiny", source="learn_distill stage 1")
    stage1 = train(cfg1, resume=None, progress=False)["final"]
    left = max(0.5, minutes - (time.monotonic() - t0) / 60)
    cfg2 = stage2_config(data, out / "stage2", stage1, left, seed, source="learn_distill stage 2")
    return train(cfg2, resume=None, progress=False)["final"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="a trained tiny stage-2 model folder (default: train one here)")
    p.add_argument("--stage1", default=None, help="with no --teacher: continue stage 1 from this stage-1 model")
    p.add_argument("--teacher-minutes", type=float, default=14.0)
    p.add_argument("--data", default=None, help="the synthetic set the teacher was trained on (default: make it)")
    p.add_argument("--minutes", type=float, default=10.0, help="distillation wall time")
    p.add_argument("--out", default="/tmp/emo_learn_distill")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4, help="low: the student starts as the teacher")
    p.add_argument("--identities", type=int, default=2, help="identities rendered at evaluation")
    p.add_argument("--eval-seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t_start = start_learning_run(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        generate_dataset(data, clips=24, size=args.size, seconds=4.0, identities=4, seed=args.seed)
    teacher = args.teacher or train_teacher(data, out / "teacher", args.teacher_minutes, args.seed, args.stage1)
    t_teacher = time.monotonic() - t_start

    cfg = config_from_dict({"stage": "distill",
                            "distill": {"teacher": teacher, "steps": args.steps, "teacher_steps": args.teacher_steps},
                            "data": {"root": str(data), "clip_frames": 8, "motion_drop": 0.3},
                            "train": {"output_dir": str(out / "student"), "max_steps": 100000,
                                      "batch_size": args.batch_size, "lr": args.lr, "motion_noise": 0.3,
                                      "checkpoint_every": 100000, "log_every": 10, "max_minutes": args.minutes,
                                      "seed": args.seed}}, source="learn_distill")
    t1 = time.monotonic()
    result = train(cfg, resume=None, progress=False)
    t_distill = time.monotonic() - t1

    audio = random_speech(np.random.default_rng([args.seed, 999]), args.eval_seconds)  # held out
    t2 = time.monotonic()
    ref = render(teacher, args.size, audio, args.teacher_steps, None, args.identities, args.seed)
    teacher4 = render(teacher, args.size, audio, args.steps, None, args.identities, args.seed)
    student = render(result["final"], args.size, audio, args.steps, None, args.identities, args.seed)
    t_eval = time.monotonic() - t2
    # contact sheet: reference / teacher 4 steps / student, first identity
    save_contact_sheet(out / "distill_frames.png", [v[0][::8][:10] for v in (ref, teacher4, student)])
    from emo_stream.families.emo.backend import load_model

    guidance = load_model(teacher).config.sampling.guidance
    res = {
        "bench": "learn_distill",
        "device": shared_cpu_device(args.threads),
        "torch": torch.__version__, "size": args.size, "teacher": teacher,
        "method": "one-round progressive distillation with the teacher's guidance in the targets (docs/training.md)",
        "reference": {"steps": args.teacher_steps, "guidance": guidance, "who": "teacher"},
        "teacher_4_steps": {"steps": args.steps, "guidance": guidance,
                            **compare(teacher4, ref, audio)},
        "student_4_steps": {"steps": args.steps, "guidance": 1.0, **compare(student, ref, audio)},
        "reference_r": compare(ref, ref, audio)["r"],
        "distill": {"steps": result["steps"], **loss_summary(result["losses"], decimals=5),
                    "batch_size": args.batch_size, "lr": args.lr,
                    "teacher_steps": args.teacher_steps},
        "eval": {"speech_seconds": args.eval_seconds, "held_out": True, "identities": args.identities,
                 "distance": "mean absolute pixel error (0-255) and PSNR of each render to the 40-step reference"},
        "minutes": {"teacher": round(t_teacher / 60, 2), "distill": round(t_distill / 60, 2),
                    "eval": round(t_eval / 60, 2), "total": round((time.monotonic() - t_start) / 60, 2)},
    }
    s, t = res["student_4_steps"], res["teacher_4_steps"]
    res["student_closer_than_teacher_4"] = bool(s["mae_to_reference"] < t["mae_to_reference"])
    res["student_r_at_least_0_5"] = bool(s["r"] >= 0.5)
    res["target"] = "student closer to the 40-step guided reference than the teacher's 4 steps; student r >= 0.5"
    emit_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
