"""EchoMimic v1 speed: offline seconds of compute per second of video, and live segment cost.

    python bench/echomimic.py --model ~/models/EchoMimic --size 512 --device cuda --dtype float16
    python bench/echomimic.py --model tests-folder --size 128 --threads 1 --seconds 4     # tiny weights, CPU

--model is an EchoMimic download folder (as it comes) or our checkpoint of one. Prints JSON {device, weights,
size, steps, guidance, decoder, offline: {frames, seconds_per_video_second}, live: {segment_frames,
held_frames, segment_seconds (median), seconds_per_video_second, fps}, ...}. Offline renders the whole audio
with EchoMimic's windows at 24 fps; live runs segments of the backend's stream_segment_frames at 25 fps, each
holding the previous segment's tail (docs/streaming.md). One warm-up run is excluded. The portrait is a
synthetic crop (no face detection).
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
from emo_stream.families.echomimic.backend import create_backend


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> int:
    p = argparse.ArgumentParser(description="EchoMimic offline and live benchmark")
    p.add_argument("--model", required=True, help="EchoMimic download folder or our checkpoint of one")
    add_render_args(p, size=512)
    p.add_argument("--seconds", type=float, default=4.0, help="audio duration to render offline")
    p.add_argument("--segments", type=int, default=6, help="live segments to time")
    args = p.parse_args()
    apply_threads(args.threads)

    opts = dict(size=args.size, device=args.device, dtype=args.dtype, steps=args.steps, guidance=args.guidance,
                decoder=args.decoder)
    offline = create_backend(args.model, fps=24, **opts)
    live = create_backend(args.model, fps=25, **opts)
    dev = offline.device
    rng = np.random.default_rng(0)
    s = args.size
    img = (rng.random((s, s, 3)) * 255).astype(np.uint8)
    avatar = offline.avatar_from_crop(img, np.array([s * .3, s * .25, s * .7, s * .7]))
    audio = (rng.standard_normal(int(args.seconds * 16000)) * 0.1).astype(np.float32)

    list(offline.render_video(avatar, audio[:16000], seed=0))   # warm-up
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    frames = sum(len(f) for f, _ in offline.render_video(avatar, audio, seed=0))
    _sync(dev)
    off_s = time.perf_counter() - t0

    n = live.stream_segment_frames
    spf = 16000 // live.fps
    state = live.new_state(avatar, 0)
    long_audio = np.tile(audio, args.segments + 2)
    times = []
    for k in range(args.segments + 1):   # the first segment has nothing to hold: excluded (warm-up)
        feats = live.encode_audio(long_audio, k * n * spf, n)
        _sync(dev)
        t0 = time.perf_counter()
        live.generate([SegmentJob(avatar, state, feats, n)])
        _sync(dev)
        times.append(time.perf_counter() - t0)
    seg = float(np.median(times[1:]))
    t0 = time.perf_counter()
    live.encode_audio(long_audio, 2 * 16000, n)
    _sync(dev)
    enc = time.perf_counter() - t0
    peak, peak_kind = peak_memory(dev)
    emit_json({
        "device": device_name(dev),
        "model": args.model,
        "weights": offline.model.weights,
        "size": s,
        "steps": offline.sampling.steps,
        "guidance": offline.sampling.guidance,
        "decoder": offline.decoder,
        "dtype": str(offline.model.dtype).replace("torch.", ""),
        "offline": {"fps": offline.fps, "frames": frames, "seconds": round(off_s, 3),
                    "seconds_per_video_second": round(off_s / (frames / offline.fps), 3)},
        "live": {"fps_clock": live.fps, "segment_frames": n, "held_frames": live.live_overlap,
                 "segment_seconds": round(seg, 4), "audio_encode_seconds": round(enc, 4),
                 "seconds_per_video_second": round((seg + enc) / (n / live.fps), 3),
                 "fps": round(n / (seg + enc), 2)},
        "peak_memory": peak,
        "peak_memory_kind": peak_kind,
        "load_average_1m": load_average(),
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
