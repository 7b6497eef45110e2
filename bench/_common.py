"""Helpers the benchmarks share: naming the device, reading memory, printing/writing the JSON result, a `serve`
process to measure and a bot that talks to it.

Benchmarks run as scripts (`python bench/x.py`), so Python puts bench/ first on sys.path and they import
this module as `_common`. Importing it also puts the repository root on sys.path, for `emo_stream`/`server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: Any = None, detail: str | None = None) -> str:
    """"cuda: <GPU name>" for a CUDA device, else "cpu: <CPU model> (<detail>)".

    `detail` defaults to the core count, plus torch's thread count when torch is loaded."""
    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    if detail is None:
        detail = f"{os.cpu_count()} cores"
        torch = sys.modules.get("torch")  # never import torch just to describe the CPU
        if torch is not None:
            detail += f", torch threads {torch.get_num_threads()}"
    return f"cpu: {cpu_name()} ({detail})"


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: Any = None) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max_memory_allocated on a GPU, else the process's max RSS."""
    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return peak_rss_bytes(), "process max RSS"


def load_average() -> float:
    """1-minute load average: the machine is shared, so it is context for every timing."""
    return round(os.getloadavg()[0], 2)


def emit_json(result: dict[str, Any], out: str | Path | None = None, indent: int = 2) -> str:
    """Print the result as JSON and, with `out`, also write it there (parent folders made)."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


def add_render_args(p: argparse.ArgumentParser, size: int) -> None:
    """The options every offline-render benchmark shares (bench/generate.py, bench/echomimic.py): image size,
    sampling overrides, device/dtype, CPU threads and where to write the JSON."""
    p.add_argument("--size", type=int, default=size)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--decoder", choices=["vae", "taesd"], default="vae")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also write the JSON here")


def apply_threads(threads: int | None) -> None:
    """--threads, if given: a script, so setting process-wide torch threads is fine here."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def start_server_process(args: list[str], repo: str | Path = REPO, timeout: float = 120.0, **options):
    """`serve *args` in a child process with the code of the checkout `repo`: (process, base URL); exits with
    the server's last lines of output where it does not start (server/serve_process.py, which takes
    `options`)."""
    from server.serve_process import ServerDidNotStart, start_serve_process

    try:
        return start_serve_process(args, repo=repo, timeout=timeout, **options)
    except ServerDidNotStart as exc:
        raise SystemExit(str(exc)) from None


@contextlib.asynccontextmanager
async def talking_in_real_time(bot, clip, pause_s: float) -> AsyncIterator[None]:
    """While inside: the bot says `clip` (16 kHz float speech) over and over, in 20 ms messages at real-time pace
    as a voice pipeline sends them, each time one utterance followed by `pause_s` of silence."""
    chunk = 320

    async def talk() -> None:
        # paced on an absolute clock: sleeping 20 ms after each send oversleeps a little every time, and audio
        # that arrives slower than real time makes fewer than 25 frames a second by itself (23.6-24.1 measured)
        due = time.monotonic()
        while True:
            for i in range(0, len(clip), chunk):
                await bot.send_audio(clip[i:i + chunk])
                due += chunk / 16000
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await bot.end_segment()
            due += pause_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    task = asyncio.create_task(talk())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---- the learning proofs (bench/learn_sync.py, learn_distill.py, learn_musetalk_sync.py) ------------------------
def start_learning_run(threads: int) -> float:
    """Timestamped log lines (training logs its progress) and `threads` torch CPU threads; the start time."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    return time.monotonic()


def shared_cpu_device(threads: int) -> str:
    """The device of a CPU learning run, with the load average at its end: other work on the shared machine
    stretches its minutes."""
    return device_name(detail=f"{os.cpu_count()} cores, torch threads {threads}; shared with other work: "
                              f"load average {os.getloadavg()[0]:.1f} at the end")


def loss_summary(losses: list[float], decimals: int = 4) -> dict[str, float]:
    """Mean loss of the first and of the last tenth of the steps (single steps are noisy)."""
    import numpy as np

    k = max(1, len(losses) // 10)
    return {"loss_first": round(float(np.mean(losses[:k])), decimals),
            "loss_last": round(float(np.mean(losses[-k:])), decimals)}


def save_contact_sheet(path: str | Path, rows: list) -> None:
    """Frames side by side, one row per sequence of (H, W, 3) uint8 frames, as a picture next to the JSON."""
    import numpy as np

    try:
        from PIL import Image

        Image.fromarray(np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)).save(path)
    except Exception:  # noqa: BLE001 (a picture is a bonus: the measured result stands without it)
        pass
