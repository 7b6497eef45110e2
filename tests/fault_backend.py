"""A fault-injecting backend for tests: the synctest pattern, with the failures a GPU backend can have.

    FaultBackend(oom_seeds={1})          any batch holding a session opened with seed 1 raises a simulated
                                         CUDA out-of-memory (torch.OutOfMemoryError), however it is split
    FaultBackend(oom_batches_over=1, oom_times=1)
                                         the first batch of more than one session runs out of memory (a
                                         transient failure of the batch, not of a session)
    FaultBackend(device_error_after=N)   every call after the first N raises a CUDA device error (sticky, as a
                                         lost or corrupted CUDA context is)
    FaultBackend(hang_seeds={1})         a call holding seed 1's session never returns until .release is set

Calls (the session seeds of each) are recorded in .calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

import torch   # imported here, not in the failing call: a first torch import takes seconds (a stall of its own)

from emo_stream.backend import SegmentJob
from emo_stream.families.synctest.backend import SyncTestBackend


@dataclass
class FaultState:
    inner: Any
    seed: int


def out_of_memory() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity; "
                                  "77.80 GiB already allocated) [simulated]")


class FaultBackend(SyncTestBackend):
    name = "faulty"

    def __init__(self, size: int = 64, fps: int = 25, *, oom_seeds=(), oom_batches_over: int | None = None,
                 oom_times: int = 1, device_error_after: int | None = None, hang_seeds=(),
                 concurrent: bool = True) -> None:
        super().__init__(size=size, fps=fps)
        self.concurrent_generate = concurrent
        self.oom_seeds = set(oom_seeds)
        self.oom_batches_over = oom_batches_over
        self.oom_times = oom_times
        self.device_error_after = device_error_after
        self.hang_seeds = set(hang_seeds)
        self.release = threading.Event()
        self.calls: list[list[int]] = []
        self._lock = threading.Lock()

    def new_state(self, avatar, seed: int = 0) -> FaultState:
        return FaultState(super().new_state(avatar, seed), seed)

    def generate(self, jobs: list[SegmentJob]) -> list:
        seeds = [j.state.seed for j in jobs]
        with self._lock:
            self.calls.append(seeds)
            n = len(self.calls)
        if self.device_error_after is not None and n > self.device_error_after:
            raise RuntimeError("CUDA error: an illegal memory access was encountered [simulated]")
        if self.hang_seeds & set(seeds):
            self.release.wait()
        if self.oom_seeds & set(seeds):
            raise out_of_memory()
        if self.oom_batches_over is not None and len(jobs) > self.oom_batches_over and self.oom_times > 0:
            self.oom_times -= 1
            raise out_of_memory()
        return super().generate([replace(j, state=j.state.inner) for j in jobs])


class SplitFaultBackend(FaultBackend):
    """The same pattern with generation split in denoise and decode (as EMO, EchoMimic, MuseTalk are), and
    out-of-memory injected into decode: any decode batch holding a session opened with a seed in
    `decode_oom_seeds` raises. Latents are a list with one entry per job (the engine splits that itself), or
    with `one_object` one object for the batch that only the backend's `select_latents` can split."""

    name = "faulty-split"

    def __init__(self, *args, decode_oom_seeds=(), one_object: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decode_oom_seeds = set(decode_oom_seeds)
        self.one_object = one_object
        self.decode_calls: list[list[int]] = []
        if one_object:
            self.select_latents = lambda latents, indices: _Latents([latents.frames[i] for i in indices])

    def denoise(self, jobs: list[SegmentJob]):
        frames = self.generate(jobs)
        return _Latents(frames) if self.one_object else frames

    def decode(self, jobs: list[SegmentJob], latents) -> list:
        seeds = [j.state.seed for j in jobs]
        with self._lock:
            self.decode_calls.append(seeds)
        if self.decode_oom_seeds & set(seeds):
            raise out_of_memory()
        return list(latents.frames if self.one_object else latents)


@dataclass
class _Latents:
    frames: list
