"""Streaming engine benchmark: a speech file fed to N sessions in real time and as fast as possible.

    python bench/stream.py --backend preview --sessions 1 --seconds 20
    python bench/stream.py --backend emo --model tiny --size 64 --steps 4
    python bench/stream.py --backend emo --model sd15 --size 512 --steps 4 --decoder taesd --sessions 4

Prints one JSON object: the setup (device, backend, preset, size, steps, decoder, segment frames,
sessions) and per mode: throughput (speech frames generated per second, all sessions together),
latency p50/p95 (from a frame's audio and look-ahead being complete to the frame being ready, as the
engine measures it), first-frame latency, dropped/late frames, and memory per session.
In "realtime" mode each session pushes 20 ms chunks paced by the wall clock (a microphone); in "fast"
mode it pushes the whole file at once and backpressure paces it (a bot); latency is only meaningful in
realtime mode (in fast mode it includes time spent queued behind earlier audio).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, device_name, emit_json, load_average, rss_mb  # bench/; puts the repo on sys.path
from emo_stream.backend import capabilities
from emo_stream.registry import family_names, create_backend
from emo_stream.pcm import float_to_pcm16
from emo_stream.timeline import SAMPLE_RATE
from emo_stream.media import load_audio, load_image
from emo_stream.streaming import EngineConfig, StreamingEngine

SHARED = REPO.parent / "shared" / "data"
DEFAULT_AUDIO = SHARED / "audio" / "eng_60s_16k.wav"
DEFAULT_PORTRAIT = SHARED / "portraits" / "hallo_1.jpg"
CHUNK_S = 0.02


def speech_audio(path: str | None, seconds: float | None) -> tuple[np.ndarray, str]:
    if path is None and DEFAULT_AUDIO.is_file():
        path = str(DEFAULT_AUDIO)
    if path is None:   # espeak-ng fallback
        import subprocess

        out = Path(tempfile.mkdtemp()) / "speech.wav"
        text = "The quick brown fox jumps over the lazy dog. " * 4
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(out), text], check=True, capture_output=True)
        path = str(out)
    audio = load_audio(path)
    if seconds:
        audio = audio[: int(seconds * SAMPLE_RATE)]
    return audio, Path(path).name


def portrait(path: str | None) -> np.ndarray:
    if path:
        return load_image(path)
    if DEFAULT_PORTRAIT.is_file():
        return load_image(DEFAULT_PORTRAIT)
    from emo_stream.default_avatar import default_portrait

    return default_portrait(512)


async def run_mode(engine: StreamingEngine, avatar, audio: np.ndarray, sessions: int, realtime: bool) -> dict:
    chunk = int(CHUNK_S * SAMPLE_RATE)
    opened = [engine.open_session(avatar, seed=i) for i in range(sessions)]
    pcm = float_to_pcm16(audio)
    first_ready: list[float] = []

    async def produce(session) -> None:
        t0 = time.perf_counter()
        if realtime:
            for k, i in enumerate(range(0, len(pcm), chunk)):
                delay = t0 + k * CHUNK_S - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await session.push_audio(pcm[i:i + chunk], sample_rate=SAMPLE_RATE)
        else:
            await session.push_audio(pcm, sample_rate=SAMPLE_RATE)
        session.end_of_speech()

    async def consume(session) -> int:
        n = 0
        async for f in session.frames():
            if f.speech:
                n += 1
                if n == 1:
                    first_ready.append(time.perf_counter())
            if f.segment_end:
                return n
        return n

    t0 = time.perf_counter()
    producers = [asyncio.create_task(produce(s)) for s in opened]
    counts = await asyncio.gather(*(consume(s) for s in opened))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*producers)
    stats = [s.stats() for s in opened]
    for s in opened:
        await s.close()
    lat = [st["latency_ms"] for st in stats]
    frames = int(sum(counts))
    return {
        "mode": "realtime" if realtime else "fast",
        "audio_seconds": round(len(audio) / SAMPLE_RATE, 2),
        "wall_seconds": round(elapsed, 2),
        "speech_frames": frames,
        "throughput_fps": round(frames / elapsed, 1),
        "throughput_fps_per_session": round(frames / elapsed / sessions, 1),
        "realtime_factor": round(frames / engine.fps / elapsed / sessions, 2),
        "latency_ms": {"p50": float(np.median([x["p50"] for x in lat if x["p50"] is not None])),
                       "p95": float(max(x["p95"] for x in lat if x["p95"] is not None))},
        "segment_latency_ms": {"p50": float(np.median([st["segment_latency_ms"]["p50"] for st in stats])),
                               "p95": float(max(st["segment_latency_ms"]["p95"] for st in stats))},
        "first_frame_after_start_ms": round(1000 * (min(first_ready) - t0), 1),
        "dropped_frames": sum(st["dropped_frames"] for st in stats),
        "late_frames": sum(st["late_frames"] for st in stats),
        "voiced_frames": sum(st["voiced_frames"] for st in stats),
    }


async def clear_to_idle(engine: StreamingEngine, avatar, audio: np.ndarray) -> float:
    """Milliseconds from session.clear() in the middle of speech to the first idle frame being available."""
    session = engine.open_session(avatar)
    await session.push_audio(audio[: SAMPLE_RATE * 5])
    async for f in session.frames():
        if f.speech and f.index > 30:
            break
    t0 = time.perf_counter()
    session.clear()
    async for f in session.frames():
        if not f.speech:
            break
    ms = 1000 * (time.perf_counter() - t0)
    await session.close()
    return round(ms, 1)


async def main_async(args) -> dict:
    options = {k: v for k, v in (("steps", args.steps), ("decoder", args.decoder)) if v is not None}
    backend = create_backend(args.backend, args.model, size=args.size, fps=25, device=args.device, **options)
    audio, audio_name = speech_audio(args.audio, args.seconds)
    caps = capabilities(backend)
    if args.workers and args.workers > 1 and not caps.concurrent_generate:
        logging.warning("backend %s does not declare concurrent_generate: its calls stay serialised", backend.name)
    config = EngineConfig(segment_frames=args.segment_frames, max_sessions=args.sessions + 1,
                          max_batch=args.max_batch or args.sessions, vad=not args.no_vad,
                          generate_workers=args.workers)
    engine = StreamingEngine(backend, config)
    await engine.start()
    rss0 = rss_mb()
    avatar = await engine.prepare_avatar(portrait(args.portrait))
    # warm-up: one short utterance (lazy initialisation, caches)
    warm = await run_mode(engine, avatar, audio[:SAMPLE_RATE], 1, realtime=False)
    del warm
    rss_avatar = rss_mb()
    runs = []
    for mode in (["realtime", "fast"] if args.mode == "both" else [args.mode]):
        runs.append(await run_mode(engine, avatar, audio, args.sessions, realtime=mode == "realtime"))
    rss1 = rss_mb()
    clear_ms = await clear_to_idle(engine, avatar, audio)
    engine_stats = engine.stats()
    await engine.stop()
    return {
        "bench": "stream",
        "load_avg_1m_at_end": load_average(),   # the CPU box is shared: context for the numbers
        "device": device_name(caps.device),
        "backend": backend.name,
        "preset": args.model if args.backend == "emo" else None,
        "size": backend.size,
        "steps": getattr(backend, "steps", None),
        "idle_steps": getattr(backend, "idle_steps", None),
        "decoder": getattr(backend, "decoder", None),
        "segment_frames": args.segment_frames,
        "lookahead_frames": backend.audio_context.lookahead_frames,
        "algorithmic_latency_ms": 1000 * (args.segment_frames + backend.audio_context.lookahead_frames) / 25,
        "sessions": args.sessions,
        "max_batch": config.max_batch,
        "generate_workers": engine._workers,
        "vad": "silero" if not args.no_vad else "energy",
        "audio": audio_name,
        # headline figures: throughput as fast as possible, latency under a real-time feed
        "throughput_fps": next((r["throughput_fps"] for r in runs if r["mode"] == "fast"), runs[-1]["throughput_fps"]),
        "latency_ms": next((r["latency_ms"] for r in runs if r["mode"] == "realtime"), runs[0]["latency_ms"]),
        "segment_latency_ms": next((r["segment_latency_ms"] for r in runs if r["mode"] == "realtime"),
                                   runs[0]["segment_latency_ms"]),
        "memory_per_session_mb": round(max(0.0, rss1 - rss_avatar) / args.sessions, 1),
        "runs": runs,
        "memory_mb": {"avatar_and_warmup": round(rss_avatar - rss0, 1),
                      "per_session": round(max(0.0, rss1 - rss_avatar) / args.sessions, 1),
                      "rss_end": round(rss1, 1)},
        "clear_to_idle_ms": clear_ms,
        "stages": engine_stats["stages"],
        "mean_batch": engine_stats["mean_batch"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=family_names(), default="preview")
    p.add_argument("--model", default=None, help="EMO preset or checkpoint (tiny, sd15, PATH)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--decoder", choices=["vae", "taesd"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--segment-frames", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=None, help="default: --sessions")
    p.add_argument("--workers", type=int, default=None, help="generator threads (default: engine's choice)")
    p.add_argument("--audio", default=None, help=f"speech file (default {DEFAULT_AUDIO} if present, else espeak)")
    p.add_argument("--portrait", default=None)
    p.add_argument("--seconds", type=float, default=None, help="use only the first N seconds of the audio")
    p.add_argument("--mode", choices=["realtime", "fast", "both"], default="both")
    p.add_argument("--no-vad", action="store_true", help="energy detector instead of silero-vad")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.backend == "emo" and not args.model:
        args.model = "tiny"
    logging.basicConfig(level=logging.WARNING)
    emit_json(asyncio.run(main_async(args)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
