"""Offline EMO generation speed: seconds of compute per second of video.

    python bench/generate.py --preset tiny --size 64 --steps 4 --decoder vae --seconds 4
    python bench/generate.py --preset sd15 --size 512 --steps 40 --decoder taesd --device cuda --dtype float16

Prints JSON {device, preset, size, steps, guidance, decoder, frames, seconds_per_video_second, peak_memory, ...}.
Random weights (the arithmetic is the same as with trained ones). One warm-up clip is excluded from the
timing. The portrait is a synthetic crop (no face detection: it is not what is measured here).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

# bench/_common; importing it puts the repo on sys.path
from _common import add_render_args, apply_threads, device_name, emit_json, load_average, peak_memory
from emo_stream.backend import SegmentJob
from emo_stream.families.emo.backend import EmoBackend
from emo_stream.generate import iter_segments


def main() -> int:
    p = argparse.ArgumentParser(description="EMO offline generation benchmark")
    p.add_argument("--preset", default="tiny", help="preset name or checkpoint folder")
    add_render_args(p, size=64)
    p.add_argument("--seconds", type=float, default=4.0, help="audio duration to render (after warm-up)")
    args = p.parse_args()
    apply_threads(args.threads)

    backend = EmoBackend.load(args.preset, size=args.size, device=args.device, steps=args.steps,
                              guidance=args.guidance, decoder=args.decoder, dtype=args.dtype)
    dev = backend.device
    rng = np.random.default_rng(0)
    img = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)
    s = args.size
    avatar = backend.avatar_from_crop(img, np.array([s * .3, s * .25, s * .7, s * .7]))
    audio = (rng.standard_normal(int(args.seconds * 16000)) * 0.1).astype(np.float32)

    # warm-up: one clip (kernels, allocator, silent features)
    feats = backend.encode_audio(np.zeros(backend.audio_context.left_samples + 20 * backend.spf, np.float32),
                                 backend.audio_context.left_samples, backend.clip_frames)
    backend.generate([SegmentJob(avatar, backend.new_state(avatar, 0), feats, backend.clip_frames)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)

    t0 = time.perf_counter()
    frames = 0
    for clip, _ in iter_segments(backend, avatar, audio, seed=0):
        frames += len(clip)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    video_seconds = frames / backend.fps
    peak, peak_kind = peak_memory(dev)
    report = {
        "device": device_name(dev),
        "preset": args.preset,
        "size": args.size,
        "steps": backend.steps,
        "guidance": backend.guidance,
        "decoder": backend.decoder,
        "dtype": str(backend.model.dtype).replace("torch.", ""),
        "clip_frames": backend.clip_frames,
        "frames": frames,
        "seconds": round(elapsed, 3),
        "seconds_per_video_second": round(elapsed / video_seconds, 3),
        "fps": round(frames / elapsed, 2),
        "peak_memory": peak,
        "peak_memory_kind": peak_kind,
        "load_average_1m": load_average(),  # CPU timings on a shared machine: context
    }
    emit_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
