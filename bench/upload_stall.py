"""Upload stall: do other sessions keep their frame rate while someone uploads hostile images?

Two bots stream speech over the WebSocket API and take JPEG frames back; in one phase nothing else happens,
in the other a third connection uploads a 5000x5000 one-bit PNG (a few KB, no face) five times, one after
the other. Both phases run against the same server process, one after the other, so the comparison is a
ratio on one machine at one time (the machine is shared: the load average is recorded too).

    python bench/upload_stall.py --out bench/results/upload_stall-cpu.json
    python bench/upload_stall.py --baseline-repo /path/to/older/checkout   # the same, then the older code

Goal (issue 20): with uploads, no frame gap above 200 ms and at least 24 fps in both sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import (  # bench/; puts the repo on sys.path
    REPO, device_name, emit_json, load_average, rss_mb, start_server_process, talking_in_real_time)
from server.bot_client import BotClient, BotError, ReceivedFrame

from server_load import proc_cpu_seconds, speech_clip  # noqa: E402  (bench/ is on sys.path)


def bomb_png() -> bytes:
    """5000x5000 pixels, one bit each, all white (no face): a few KB on the wire, 25 MP to decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (5000, 5000), 1).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


async def bot_session(url: str, clip: np.ndarray, seconds: float, warmup: float) -> dict:
    async with BotClient(url, decode=False) as bot:
        await bot.start(sample_rate=16000, frames="jpeg")
        arrivals: list[float] = []
        t0 = time.monotonic()
        async with talking_in_real_time(bot, clip, pause_s=0.5):
            async for item in bot.receive(timeout=10):
                now = time.monotonic()
                if isinstance(item, ReceivedFrame) and now - t0 >= warmup:
                    arrivals.append(now)
                if now - t0 >= warmup + seconds:
                    break
        await bot.stop()
    gaps = np.diff(arrivals) if len(arrivals) > 1 else np.zeros(1)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 1e-9
    return {"frames": len(arrivals), "fps": round((len(arrivals) - 1) / span, 2),
            "max_gap_ms": round(float(gaps.max()) * 1000, 1),
            "gap_ms_p99": round(float(np.percentile(gaps, 99)) * 1000, 1)}


async def uploader(url: str, data: bytes, count: int, delay: float) -> list[dict]:
    await asyncio.sleep(delay)
    out = []
    async with BotClient(url) as bot:
        for _ in range(count):
            t = time.monotonic()
            try:
                await bot.upload_avatar(data, "image/png")
                answer = "accepted"
            except BotError as exc:
                answer = f"{exc.code}: {exc}"
            out.append({"seconds": round(time.monotonic() - t, 2), "answer": answer[:120]})
    return out


async def phase(url: str, pid: int, clip: np.ndarray, args, uploads: bool) -> dict:
    bomb = bomb_png()   # made before the sessions start: encoding it takes this process ~1 s
    cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
    upload = asyncio.ensure_future(uploader(url, bomb, args.uploads, args.warmup + 1.0)) if uploads else None
    sessions = await asyncio.gather(*(bot_session(url, clip, args.seconds, args.warmup) for _ in range(2)))
    out = {"sessions": sessions,
           "server_cpu_cores": round((proc_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0), 2)}
    if upload is not None:
        out["uploads"] = await upload   # the uploads may outlast the measured window (they are refused)
    out["max_gap_ms"] = max(s["max_gap_ms"] for s in sessions)
    out["min_fps"] = min(s["fps"] for s in sessions)
    return out


def start(repo: Path, size: int) -> tuple[subprocess.Popen, str]:
    """`serve` from the checkout at `repo` (this one, or --baseline-repo), preview backend, on loopback."""
    return start_server_process(["--host", "127.0.0.1", "--port", "0", "--size", str(size), "--backend", "preview",
                                 "--max-sessions", "3"], repo=repo, timeout=180)


def run_server(repo: Path, clip: np.ndarray, args) -> list[dict]:
    proc, url = start(repo, args.size)
    phases = []
    try:
        time.sleep(3.0)   # start-up work (the decode worker loading its face models) settles
        for _ in range(args.rounds):
            for uploads in (False, True):
                rss0 = rss_mb(proc.pid)
                result = asyncio.run(phase(url, proc.pid, clip, args, uploads))
                result.update(kind="uploads" if uploads else "quiet", load_average_after=load_average(),
                              server_rss_mb_before=round(rss0, 1), server_rss_mb_after=round(rss_mb(proc.pid), 1))
                phases.append(result)
                time.sleep(1.0)
    finally:
        proc.terminate()
        proc.wait(30)
    return phases


def summary(phases: list[dict]) -> dict:
    quiet = [p for p in phases if p["kind"] == "quiet"]
    loaded = [p for p in phases if p["kind"] == "uploads"]
    worst_gap = max(p["max_gap_ms"] for p in loaded)
    worst_fps = min(p["min_fps"] for p in loaded)
    quiet_gap = max(p["max_gap_ms"] for p in quiet)
    quiet_fps = min(p["min_fps"] for p in quiet)
    return {
        "uploads_max_gap_ms": worst_gap,
        "uploads_min_fps": worst_fps,
        "quiet_max_gap_ms": quiet_gap,
        "quiet_min_fps": quiet_fps,
        "gap_ratio_uploads_over_quiet": round(worst_gap / max(1e-9, quiet_gap), 2),
        "fps_ratio_uploads_over_quiet": round(worst_fps / max(1e-9, quiet_fps), 3),
        "server_rss_mb_growth_in_uploads": round(max(p["server_rss_mb_after"] - p["server_rss_mb_before"]
                                                     for p in loaded), 1),
        "goal_met": bool(worst_gap <= 200 and worst_fps >= 24),
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of each phase not measured")
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="quiet/uploads pairs, alternating")
    parser.add_argument("--baseline-repo", default=None,
                        help="also run a server from this checkout (e.g. the code before a change), right after")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    load_before = load_average()
    clip = speech_clip()
    result = {
        "benchmark": "upload_stall",
        "device": device_name(detail=f"{os.cpu_count()} cores, shared with other work; server in its own process"),
        "command": "python " + " ".join(sys.argv),
        "backend": "preview",
        "size": args.size,
        "upload": f"5000x5000 one-bit PNG, {len(bomb_png())} bytes, no face, x{args.uploads} per uploads phase",
        "load_average_before": load_before,
        "this_checkout": summary(run_server(REPO, clip, args)),
    }
    if args.baseline_repo:
        result["baseline"] = {"repo": args.baseline_repo, **summary(run_server(Path(args.baseline_repo), clip, args))}
    result["load_average_after"] = load_average()
    result["note"] = ("load averages above the core count mean other work competed for the CPU: compare the "
                      "ratios (uploads phase over quiet phase, same server, minutes apart), not absolute figures")
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
