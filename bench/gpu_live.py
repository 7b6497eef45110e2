"""Live-path throughput and latency of a model family's backend, on a GPU (or, for trying the script, a CPU).

    python bench/gpu_live.py [--family emo] [--model sd15_live] [--size 512] [--sessions 1,4,8,16] [--out DIR]
    python bench/gpu_live.py --family echomimic --model acc --offline-model acc
    python bench/gpu_live.py --family musetalk --model full --sessions 1,8,16,32 --offline-model full

Families: emo (models: presets such as sd15_live, sd15, tiny), echomimic (acc, normal, tiny: EchoMimic v1's
architecture with random weights, TAESD live), musetalk (full: MuseTalk 1.5's published networks with random
weights, SD VAE decode, 5-frame segments; tiny: the test networks; avatars without face parsing:
emo_stream.families.musetalk.testing.synthetic_avatar). Random weights (the arithmetic is the same as with trained ones). For each session count S: S sessions of
the live default (8-frame segments, the model's steps and guidance, TAESD) run segment after segment, batched
into one denoise and one decode call per segment as the engine does; each timed segment includes encoding
every session's audio (wav2vec2, left context included), denoising, decoding and the copy to the CPU.

Records (JSON, one file per run in --out, also printed):
    aggregate_fps              frames of all sessions per second of wall time
    segment_latency_ms p50/p95 from a segment's audio in hand to all its frames decoded on the CPU; every
                               frame of the segment is ready then, so it is also each frame's compute latency
    first_frame_ms             a fresh session's first segment (reference motion frames), 1 session, warm
    algorithmic_latency_ms     audio a frame waits for before its segment can start: the rest of its segment
                               plus the encoder look-ahead (for the first frame of a segment, the worst case)
    tflop_per_frame            counted for the same configuration (bench/flops.py, meta device)
    achieved_tflops            aggregate_fps x tflop_per_frame
    peak_memory_gib            CUDA max_memory_allocated
    calibration                serve's start-up capacity calibration on this backend (emo_stream.streaming.capacity):
                               live step seconds per batch size and the sessions they allow (`sessions`)
With --offline-model, one offline clip (the model's own steps, guidance and decoder) too: seconds of compute per
second of video.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from _common import device_name, emit_json, peak_memory  # bench/; puts the repo on sys.path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_tflop(model: str, size: int, mode: str, family: str = "emo") -> dict:
    """bench/flops.py's count for the same configuration (the tiny EchoMimic is counted as the full one's
    structure would not be: 0 there)."""
    if family == "musetalk":
        from emo_stream.families.musetalk.flops import count_musetalk

        if model == "tiny":
            return {"tflop_per_frame_total": 0.0, "tflop_per_frame_per_step": 0.0, "parts": {"reference": 0.0},
                    "steps": 1, "guidance": 1.0, "decoder": "vae"}
        return count_musetalk("vae")
    if family == "echomimic":
        from emo_stream.families.echomimic.flops import count_echomimic

        if model == "tiny":
            return {"tflop_per_frame_total": 0.0, "tflop_per_frame_per_step": 0.0, "parts": {"reference": 0.0},
                    "steps": None, "guidance": None, "decoder": None}
        return count_echomimic(model, mode, size=size)
    from emo_stream.families.emo.flops import count_emo

    return count_emo(model, mode, size=size)


def load_echomimic(model: str, size: int, device: torch.device, dtype: str, compile: str = "off", decoder="taesd"):
    """EchoMimic v1 (acc / normal weights set, or the tiny test architecture) with random weights, initialised
    on the device, and the sd15 (or tiny) TAESD for live decoding."""
    from diffusers import AutoencoderTiny

    from emo_stream.families.echomimic.backend import EchoMimicBackend, ModelParts
    from emo_stream.blocks.device import parse_dtype as _parse_dtype
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.echomimic.config import EchoMimicConfig
    from emo_stream.families.echomimic.model import EchoMimicModel
    from emo_stream.families.echomimic.testing import tiny_config

    sd = load_config("tiny" if model == "tiny" else "sd15")
    if model == "tiny":
        cfg = tiny_config()
        cfg.vae = sd.vae
    else:
        cfg = EchoMimicConfig(weights_set=model, vae=sd.vae)
    dt = _parse_dtype(dtype, device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        m = EchoMimicModel.build(cfg)
        taesd = AutoencoderTiny(**sd.taesd)
    m = m.to(device, dt).eval()
    taesd = taesd.to(device, dt).eval().requires_grad_(False)
    return EchoMimicBackend(ModelParts(m, taesd), size=size, fps=25, decoder=decoder, compile=compile)


def load_musetalk(model: str, size: int, device: torch.device, dtype: str, compile: str = "off"):
    """MuseTalk 1.5 (full: the published networks' shapes; tiny: the test ones) with random weights,
    initialised on the device; the live default (5-frame segments, whisper over a padded window)."""
    from emo_stream.blocks.device import parse_dtype as _parse_dtype
    from emo_stream.families.musetalk.backend import MuseTalkBackend
    from emo_stream.families.musetalk.testing import random_model

    tiny = model == "tiny"
    m = random_model(full=not tiny, device=device, dtype=_parse_dtype(dtype, device), crop_size=64 if tiny else None)
    return MuseTalkBackend(m, size=size, fps=25, portrait_motion="still", cache_dir="", compile=compile)


def musetalk_avatar(backend, image: np.ndarray, box, frames: int):
    from emo_stream.families.musetalk.testing import synthetic_avatar

    return synthetic_avatar(backend.model, image, box, frames=frames)


def load_backend(family: str, model: str, size: int, device: torch.device, dtype: str, compile: str = "off",
                 decoder: str | None = None):
    if family == "musetalk":
        return load_musetalk(model, size, device, dtype, compile)
    if family == "echomimic":
        return load_echomimic(model, size, device, dtype, compile, decoder or "taesd")
    from emo_stream.families.emo.backend import EmoBackend

    return EmoBackend.load(model, size=size, device=str(device), dtype=dtype, compile=compile, decoder=decoder)


def run_sessions(backend, avatars, sessions: int, segments: int, warmup: int, frames: int) -> dict:
    from emo_stream.backend import SegmentJob

    dev = backend.device
    spf, left = 16000 // backend.fps, backend.audio_context.left_samples
    look = backend.audio_context.lookahead_frames
    rng = np.random.default_rng(sessions)
    audio = (rng.standard_normal(left + (frames + look) * spf) * 0.1).astype(np.float32)
    states = [backend.new_state(avatars[i % len(avatars)], seed=i) for i in range(sessions)]
    lat_ms = []
    t_all = 0.0
    for k in range(warmup + segments):
        sync(dev)
        t0 = time.perf_counter()
        jobs = [SegmentJob(avatar=s.avatar, state=s, features=backend.encode_audio(audio, left, frames),
                           num_frames=frames) for s in states]
        out = backend.decode(jobs, backend.denoise(jobs))
        sync(dev)
        dt = time.perf_counter() - t0
        assert len(out) == sessions and out[0].shape[0] == frames
        if k >= warmup:
            lat_ms.append(dt * 1000)
            t_all += dt
    return {"sessions": sessions, "segments_timed": segments, "segment_frames": frames,
            "aggregate_fps": round(sessions * frames * segments / t_all, 2),
            "segment_latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 1),
                                   "p95": round(float(np.percentile(lat_ms, 95)), 1),
                                   "max": round(max(lat_ms), 1)}}


def first_frame(backend, avatar, frames: int, repeats: int = 3) -> float:
    from emo_stream.backend import SegmentJob

    spf, left = 16000 // backend.fps, backend.audio_context.left_samples
    look = backend.audio_context.lookahead_frames
    audio = (np.random.default_rng(7).standard_normal(left + (frames + look) * spf) * 0.1).astype(np.float32)
    best = []
    for r in range(repeats):
        state = backend.new_state(avatar, seed=100 + r)  # fresh: no motion frames yet
        sync(backend.device)
        t0 = time.perf_counter()
        job = SegmentJob(avatar=avatar, state=state, features=backend.encode_audio(audio, left, frames),
                         num_frames=frames)
        backend.decode([job], backend.denoise([job]))
        sync(backend.device)
        best.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(best)), 1)


def timed_render_video(off, avatar, audio: np.ndarray, device: torch.device, family: str, model: str, size: int,
                       sampling: tuple) -> dict:
    """The family's own offline path (render_video over `audio`, after a warm-up on its first half second):
    seconds of compute per second of video. sampling: (steps, guidance, decoder) as recorded."""
    for _ in off.render_video(avatar, audio[:8000]):   # warm-up: kernels, allocator
        pass
    sync(device)
    t0 = time.perf_counter()
    frames = sum(len(f) for f, _ in off.render_video(avatar, audio))
    sync(device)
    sec = time.perf_counter() - t0
    oc = counted_tflop(model, size, "offline", family)
    steps, guidance, decoder = sampling
    return {"family": family, "model": model, "steps": steps, "guidance": guidance, "decoder": decoder,
            "frames": frames, "seconds": round(sec, 2),
            "compute_seconds_per_video_second": round(sec / (frames / off.fps), 2),
            "tflop_per_frame": oc["tflop_per_frame_total"],
            "achieved_tflops": float(f"{frames / sec * oc['tflop_per_frame_total']:.4g}")}


def offline_clip(family: str, model: str, size: int, device: torch.device, dtype: str) -> dict:
    """One offline clip with the model's own sampling (steps, guidance) and the SD VAE: seconds of compute per
    second of video. EMO: one clip of the model's clip_frames; EchoMimic: render_video over 2 s of audio
    (context windows, the whole pipeline)."""
    from emo_stream.training.synthetic import identity_reference

    off = load_backend(family, model, size, device, dtype, decoder="vae")
    image, box = identity_reference(size, seed=0, index=0)
    if family == "musetalk":   # MuseTalk's own offline path: whisper over the file, clip_frames chunks, SD VAE
        tiny = model == "tiny"   # the CPU try: a short clip of a small avatar
        av = musetalk_avatar(off, image, box, frames=5 if tiny else 25)
        audio = (np.random.default_rng(3).standard_normal((1 if tiny else 4) * 16000) * 0.1).astype(np.float32)
        return timed_render_video(off, av, audio, device, family, model, size, (1, 1.0, "vae"))
    av = off.avatar_from_crop(image, box)
    if family == "echomimic":
        audio = (np.random.default_rng(3).standard_normal(32000) * 0.1).astype(np.float32)
        return timed_render_video(off, av, audio, device, family, model, size,
                                  (off.sampling.steps, off.sampling.guidance, off.decoder))
    f = off.clip_frames
    timing = run_sessions(off, [av], 1, 1, 1, f)
    oc = counted_tflop(model, size, "offline", family)
    return {
        "family": family, "model": model, "steps": off.steps, "guidance": off.guidance, "decoder": off.decoder,
        "clip_frames": f, "seconds_per_clip": round(timing["segment_latency_ms"]["p50"] / 1000, 2),
        "compute_seconds_per_video_second": round(timing["segment_latency_ms"]["p50"] / 1000 / (f / off.fps), 2),
        "tflop_per_frame": oc["tflop_per_frame_total"],
        "achieved_tflops": float(f"{timing['aggregate_fps'] * oc['tflop_per_frame_total']:.4g}")}


def calibration(backend, avatar, frames: int, args) -> dict:
    """What `serve` would time at start-up for its default capacity (emo_stream.streaming.capacity), at the
    engine's default max_batch: the live step per batch size and the sessions it allows at 80% of real time, to
    compare with the aggregate fps measured above."""
    from emo_stream.streaming.capacity import HEADROOM, calibrate
    from emo_stream.streaming.types import EngineConfig

    cal = calibrate(backend, avatar, segment_frames=frames, max_batch=EngineConfig().max_batch,
                    warmup=args.warmup, repeats=max(1, min(3, args.segments)))
    return {**cal.to_dict(), "headroom": HEADROOM, "sessions": cal.sessions(), "line": cal.describe()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="emo", choices=["emo", "echomimic", "musetalk"])
    p.add_argument("--model", default=None, help="emo: a preset (default sd15_live); echomimic: acc, normal or "
                   "tiny; musetalk: full or tiny")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--sessions", default="1,4,8,16")
    p.add_argument("--segments", type=int, default=6, help="timed segments per session count")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--compile", default="off", help="off | default | reduce-overhead | max-autotune")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip the start-up capacity calibration serve would run (recorded as `calibration`)")
    p.add_argument("--offline-model", default=None, help="also time one offline clip of this preset (e.g. sd15)")
    p.add_argument("--time-limit", type=float, default=400, help="seconds; stop adding session counts after it")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_live"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.monotonic()
    from emo_stream.training.synthetic import identity_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dtype = args.dtype if device.type == "cuda" else "float32"
    t0 = time.monotonic()
    args.model = args.model or {"echomimic": "acc", "musetalk": "full"}.get(args.family, "sd15_live")
    backend = load_backend(args.family, args.model, args.size, device, dtype, args.compile)
    frames = backend.stream_segment_frames
    execution = {**getattr(backend, "execution", {"compile": getattr(backend, "compile", "off")}),
                 "attention": "torch scaled_dot_product_attention"}
    musetalk = args.family == "musetalk"   # no sampling loop: one UNet call at t = 0 per frame, SD VAE decode
    steps = 1 if musetalk else getattr(backend, "steps", None) or backend.sampling.steps
    decoder = "vae" if musetalk else backend.decoder
    print(f"[gpu_live] {args.family} {args.model} loaded on {device} in {time.monotonic() - t0:.1f} s: {execution}, "
          f"steps {steps}, decoder {decoder}", flush=True)
    avatars = []
    for i in range(2):
        image, box = identity_reference(args.size, seed=0, index=i)
        # MuseTalk: 25 base frames (1 s of an idle video) per avatar; 5 for the tiny CPU try
        base = 5 if args.model == "tiny" else 25
        avatars.append(musetalk_avatar(backend, image, box, base) if musetalk else backend.avatar_from_crop(image, box))
    counted = counted_tflop(args.model, args.size, "live", args.family)
    per_frame = counted["tflop_per_frame_total"]
    # the reference is per avatar, not per frame: the timed loop does not run it
    per_frame_timed = per_frame - counted["parts"]["reference"]
    name = (f"gpu_live-{device.type}-{args.family}-{args.model}-{args.size}"
            f"{('-' + args.tag) if args.tag else ''}.json")
    res = {
        "bench": "gpu_live", "device": device_name(device), "torch": torch.__version__, "family": args.family,
        "model": args.model,
        "random_weights": True, "size": args.size, "dtype": str(dtype), "execution": execution,
        "steps": steps, "guidance": 1.0 if musetalk else getattr(backend, "guidance", None) or backend.sampling.guidance,
        "decoder": decoder,
        "segment_frames": frames, "tflop_per_frame": per_frame,
        "tflop_per_frame_per_step": counted["tflop_per_frame_per_step"], "runs": [], "first_frame_ms": None,
        "algorithmic_latency_ms": round((frames - 1 + backend.audio_context.lookahead_frames) * 1000 / backend.fps, 1),
        "calibration": None, "offline": None, "complete": False,
    }

    def save(final: bool = False) -> None:
        """Written after every measurement: a run cut short by a time limit keeps what it measured."""
        mem, what = peak_memory(device)
        res.update(peak_memory_gib=round(mem / 2 ** 30, 2), peak_memory_measure=what,
                   seconds=round(time.monotonic() - t_start, 1), complete=final)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(json.dumps(res, indent=2) + "\n")

    def time_left() -> bool:
        return time.monotonic() - t_start < args.time_limit

    for s in [int(x) for x in args.sessions.split(",") if x]:
        if not time_left():
            print(f"[gpu_live] time limit reached: skipping {s} sessions and more", flush=True)
            break
        r = run_sessions(backend, avatars, s, args.segments, args.warmup, frames)
        r["achieved_tflops"] = float(f"{r['aggregate_fps'] * per_frame_timed:.4g}")
        res["runs"].append(r)
        print(f"[gpu_live] {json.dumps(r)}", flush=True)
        save()
        if res["first_frame_ms"] is None and time_left():
            res["first_frame_ms"] = first_frame(backend, avatars[0], frames)
            print(f"[gpu_live] first frame {res['first_frame_ms']} ms", flush=True)
            save()
    if args.calibrate and time_left():
        res["calibration"] = calibration(backend, avatars[0], frames, args)
        print(f"[gpu_live] calibration {json.dumps(res['calibration'])}", flush=True)
        save()
    if args.offline_model and time_left():
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res["offline"] = offline_clip(args.family, args.offline_model, args.size, device, dtype)
        print(f"[gpu_live] offline {json.dumps(res['offline'])}", flush=True)
    save(final=True)
    emit_json(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
