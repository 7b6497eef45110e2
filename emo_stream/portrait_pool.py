"""Untrusted portraits are decoded, shrunk and searched for a face in separate processes, not where sessions run.

A hostile image costs seconds of CPU: a 3 KB 5000x5000 one-bit PNG is ~0.4 s to decode and, having no face,
~3 s of dlib's detector. Threads in the serving process cannot isolate that on a 2-core machine (they compete
with the engine at the same priority and, between C calls, for the GIL): the frames of every other session
stalled for 0.7 s. Here each job runs in a worker process that is

- low priority (`niceness`): the engine and the event loop get the CPU first, a decode takes what is left;
- memory-limited (RLIMIT_AS: `memory_mb` above what the worker needs at rest): a bomb that slips past the
  header check fails with MemoryError in the worker, not the server's pages swapping;
- time-limited (`timeout_s`): a job still running then has its worker killed and replaced;
- bounded: `workers` processes, at most `max_waiting` jobs queued behind them (more: PortraitPoolBusy).

The same decode policy applies everywhere (emo_stream.media: JPEG/PNG/WebP by magic bytes, pixels from the
header, large JPEGs decoded reduced); the face found in the worker is remembered (emo_stream.face.remember_face)
so the backend's own detect() on the same pixels does not run dlib again in the serving process.

Thread-safe and usable from any event loop (LiveKit runs each job on its own loop): `decode()` blocks,
`decode_async()` awaits. Workers start on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from emo_stream.errors import EmoStreamError, ImageInputError
from emo_stream.media import MAX_PORTRAIT_PIXELS, PORTRAIT_MAX_SIDE

log = logging.getLogger(__name__)


class PortraitPoolBusy(EmoStreamError):
    """Every decode worker is busy and the queue behind them is full: try again later."""


@dataclass(frozen=True)
class PoolLimits:
    workers: int = 1           # decode processes (each uses at most one core, at low priority)
    max_waiting: int = 4       # jobs queued behind busy workers; more are refused (PortraitPoolBusy)
    timeout_s: float = 30.0    # one job's wall-clock limit: then its worker is killed and replaced
    memory_mb: int = 1024      # address space a worker may add to what it needs at rest (RLIMIT_AS)
    niceness: int = 10         # added to the worker's nice value: the serving process comes first


class DecodedPortrait(NamedTuple):
    image: np.ndarray          # RGB uint8, longer side at most about max_side
    face: Any                  # emo_stream.face.FaceInfo, or None (no face found, or detection off)


def _worker_main(conn: Any, memory_mb: int, niceness: int, detect_faces: bool) -> None:
    """One decode worker: jobs in, results out, until the pipe closes."""
    import resource

    try:
        os.nice(niceness)
    except OSError:
        pass
    from PIL import Image

    from emo_stream.media import image_from_bytes

    analyzer = None
    if detect_faces:
        from emo_stream.face import FaceAnalyzer

        analyzer = FaceAnalyzer()
    Image.MAX_IMAGE_PIXELS = None   # each job's own max_pixels is checked from the header instead
    if memory_mb and hasattr(resource, "RLIMIT_AS"):
        try:
            with open("/proc/self/statm") as f:
                at_rest = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = at_rest + memory_mb * 2**20
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (OSError, ValueError):
            log.debug("cannot limit the decode worker's memory", exc_info=True)
    conn.send(("ready",))
    while True:
        try:
            data, what, max_side, max_pixels, min_side = conn.recv()
        except (EOFError, OSError):
            return
        try:
            image = image_from_bytes(data, max_side, max_pixels, what, min_side)
            face = analyzer.detect(image) if analyzer is not None else None
            reply: tuple = ("ok", image, None if face is None else (face.box, face.landmarks))
        except ImageInputError as exc:
            reply = ("error", str(exc))
        except MemoryError:
            reply = ("error", f"{what}: the image needs more memory to decode than allowed; use a smaller one")
        except Exception as exc:   # a decoder bug on hostile data: this image fails, the worker goes on
            reply = ("error", f"{what}: the image could not be decoded ({exc.__class__.__name__})")
        del data
        image = None
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, limits: PoolLimits, detect_faces: bool):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, name="emo-portrait-decode", daemon=True,
                                   args=(child, limits.memory_mb, limits.niceness, detect_faces))
        self.process.start()
        child.close()
        self.ready = False
        # close() may run in the server's thread while a driver thread ends the same worker: the pipe is
        # closed once (a second close of its fd number could close a file opened meanwhile)
        self._close_lock = threading.Lock()
        self._pipe_closed = False

    def _close_pipe(self) -> None:
        with self._close_lock:
            if self._pipe_closed:
                return
            self._pipe_closed = True
            self.conn.close()

    def call(self, job: tuple, timeout: float) -> tuple:
        """Send a job, wait for its reply. TimeoutError / EOFError when the worker hangs or died."""
        self.wait_ready(max(timeout, 120.0))   # start-up (imports, dlib's models) is not the job's time
        self.conn.send(job)
        if not self.conn.poll(timeout):
            raise TimeoutError
        return self.conn.recv()

    def wait_ready(self, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait for the worker's start-up signal, in short polls so that a pool being closed does not hold
        the process's exit for the whole start-up timeout (executor threads are joined at exit)."""
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        while not self.conn.poll(min(0.25, max(0.0, deadline - time.monotonic()))):
            if cancelled() or time.monotonic() >= deadline:
                raise TimeoutError
        self.conn.recv()
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self._close_pipe()

    def stop(self) -> None:
        self._close_pipe()   # the worker sees EOF and returns
        self.process.join(2)
        if self.process.is_alive():
            self.kill()


class PortraitPool:
    """See the module docstring. One per server or LiveKit worker; close() ends its processes."""

    def __init__(self, limits: PoolLimits = PoolLimits(), detect_faces: bool = True):
        if limits.workers < 1 or limits.max_waiting < 0 or limits.timeout_s <= 0:
            raise ValueError(f"bad portrait pool limits: {limits}")
        self.limits = limits
        self.detect_faces = detect_faces
        self._ctx = multiprocessing.get_context("spawn")   # no copy of the server's threads and memory
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()   # every started worker, busy or idle: close() ends them all
        self._pending = 0   # jobs running or queued
        self._closed = False
        # one driver thread per worker process: waiting for a worker never ties up the event loop's
        # default executor, which the server uses for JPEG encoding
        self._drivers = concurrent.futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="portrait-pool")
        self.jobs_done = 0
        self.workers_killed = 0
        self.last_pids: list[int] = []   # the worker processes that ran the latest jobs (tests, logs)

    # -- public ------------------------------------------------------------------------------------
    def submit(self, data: bytes, *, what: str = "image", max_side: int | None = PORTRAIT_MAX_SIDE,
               max_pixels: int = MAX_PORTRAIT_PIXELS, min_side: int = 1) -> concurrent.futures.Future:
        """Queue a decode; PortraitPoolBusy at once when workers + max_waiting jobs are already pending."""
        with self._lock:
            if self._closed:
                raise PortraitPoolBusy("the server is shutting down")
            if self._pending >= self.limits.workers + self.limits.max_waiting:
                raise PortraitPoolBusy(f"{what}: too many images are being prepared right now; try again shortly")
            self._pending += 1
        try:
            future = self._drivers.submit(self._run, (bytes(data), what, max_side, max_pixels, min_side))
        except RuntimeError:   # the executor was shut down meanwhile
            with self._lock:
                self._pending -= 1
            raise PortraitPoolBusy("the server is shutting down") from None
        future.add_done_callback(self._done)
        return future

    def decode(self, data: bytes, **kwargs: Any) -> DecodedPortrait:
        """Decode in a worker and wait (from any thread). ImageInputError for what the image is to blame."""
        return self.submit(data, **kwargs).result()

    async def decode_async(self, data: bytes, **kwargs: Any) -> DecodedPortrait:
        return await asyncio.wrap_future(self.submit(data, **kwargs))

    def warm(self) -> None:
        """Start the worker processes now (in the background) rather than with the first image: start-up
        imports dlib and loads its face models, seconds of CPU."""
        for _ in range(self.limits.workers):
            try:
                self._drivers.submit(self._start_one)
            except RuntimeError:   # closed
                return

    def close(self) -> None:
        """End the workers; a job still running fails (its driver thread sees the pipe close at once)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = self._live - set(idle)
            self._live = set()
        self._drivers.shutdown(wait=False, cancel_futures=True)
        for worker in idle:
            worker.stop()
        for worker in busy:
            worker.kill()

    # -- internals ---------------------------------------------------------------------------------
    def _done(self, _future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._new_worker()

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._ctx, self.limits, self.detect_faces)
        with self._lock:
            closed = self._closed
            if not closed:
                self._live.add(worker)
        if closed:
            worker.kill()
            raise PortraitPoolBusy("the server is shutting down")
        return worker

    def _start_one(self) -> None:
        with self._lock:
            if self._closed or len(self._idle) >= self.limits.workers:
                return
        try:
            worker = self._new_worker()
        except PortraitPoolBusy:
            return
        try:
            worker.wait_ready(120.0, cancelled=lambda: self._closed)
        except (TimeoutError, EOFError, OSError):
            if not self._closed:
                log.warning("a portrait decode worker failed to start (exit code %s)", worker.process.exitcode)
            self._kill(worker)
            return
        self._give_back(worker)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.limits.workers:
                self._idle.append(worker)
                return
            self._live.discard(worker)
        worker.stop()

    def _run(self, job: tuple) -> DecodedPortrait:
        what = job[1]
        worker = self._take()
        try:
            reply = worker.call(job, self.limits.timeout_s)
        except TimeoutError:
            log.warning("%s: decoding took longer than %g s: its worker was killed", what, self.limits.timeout_s)
            self._kill(worker)
            raise ImageInputError(f"{what}: decoding took longer than {self.limits.timeout_s:g} s; "
                                  f"use a smaller or simpler image") from None
        except (EOFError, OSError):   # the worker died (a decoder crash, the memory limit hit in C code)
            if self._closed:
                raise PortraitPoolBusy("the server is shutting down") from None
            log.warning("%s: the decode worker died (exit code %s): replaced", what, worker.process.exitcode)
            self._kill(worker)
            raise ImageInputError(f"{what}: the image could not be decoded") from None
        self.last_pids = [worker.process.pid]
        self.jobs_done += 1
        self._give_back(worker)
        if reply[0] != "ok":
            raise ImageInputError(reply[1])
        _, image, face = reply
        if face is not None:
            from emo_stream.face import FaceInfo

            face = FaceInfo(box=face[0], landmarks=face[1])
        if self.detect_faces:
            from emo_stream.face import remember_face

            remember_face(image, face)   # the backend's detect() on these pixels need not run dlib here
        return DecodedPortrait(image, face)

    def _kill(self, worker: _Worker) -> None:
        with self._lock:
            self._live.discard(worker)
        self.workers_killed += 1
        worker.kill()
