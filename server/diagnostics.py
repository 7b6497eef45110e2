"""Memory and pause diagnostics for long runs: off unless $EMO_STREAM_DIAGNOSTICS names a file.

    EMO_STREAM_DIAGNOSTICS=/tmp/diag.jsonl[:SECONDS] emo-stream serve ...      (default every 30 s)
    PYTHONTRACEMALLOC=1 ...  adds tracemalloc's traced total and its biggest growth by source line

Each record (one JSON line) has the RSS, glibc's heap in use and held (mallinfo2: fragmentation shows as held
>> in use), live objects of the server's own types and the object types that grew most since the previous
record (counted after a full collection: alive, not garbage waiting for the collector), asyncio tasks and
threads, the event loop's worst lateness and the garbage collector's pauses per
generation since the previous record. Walking every object costs tens of milliseconds per record: a
debugging aid, never on by default (bench/soak.py --diagnostics turns it on for its server).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "EMO_STREAM_DIAGNOSTICS"
# types whose live count must not grow with the number of sessions a server has served
WATCHED = ("ServerSession", "StreamSession", "Playout", "Subscription", "Connection", "Outbox", "RTCPeerConnection",
           "RTCRtpSender", "RTCRtpReceiver", "RTCDtlsTransport", "RTCIceTransport", "RTCSctpTransport",
           "PlayoutVideoTrack", "PlayoutAudioTrack", "RemoteStreamTrack", "JitterBuffer", "HttpConnection",
           "AvatarHandle", "Job", "Task", "Future")

PLAYOUT_KEYS = ("frames", "late_frames", "reanchors", "behind_ms", "skipped_idle_frames", "subscriber_drops")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mib() -> dict | None:
    """glibc's main-heap figures in MiB (all arenas): in use by malloc's callers, and held (in use + free)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    mib = 1 / (1 << 20)
    return {"in_use": round((m.uordblks + m.hblkhd) * mib, 1), "free_held": round(m.fordblks * mib, 1),
            "mmapped": round(m.hblkhd * mib, 1), "arena": round(m.arena * mib, 1)}


def rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
    except OSError:
        return 0.0


class GcPauses:
    """Collector pauses per generation (count, total and worst ms) since the last take()."""

    def __init__(self) -> None:
        self._start = 0.0
        self._lock = threading.Lock()
        self._data: dict[int, list[float]] = {}
        self.muted = False   # our own forced collections are not the server's pauses

    def __call__(self, phase: str, info: dict) -> None:
        if self.muted:
            return
        if phase == "start":
            self._start = time.perf_counter()
            return
        ms = 1000 * (time.perf_counter() - self._start)
        with self._lock:
            row = self._data.setdefault(info["generation"], [0, 0.0, 0.0, 0])
            row[0] += 1
            row[1] += ms
            row[2] = max(row[2], ms)
            row[3] += info.get("collected", 0)

    def take(self) -> dict:
        with self._lock:
            data, self._data = self._data, {}
        return {f"gen{g}": {"n": int(n), "total_ms": round(t, 1), "max_ms": round(m, 1), "collected": int(c)}
                for g, (n, t, m, c) in sorted(data.items())}


class Diagnostics:
    """Writes one record every `every_s` to `path` from a task on the running loop."""

    def __init__(self, path: str, every_s: float = 30.0, server=None) -> None:
        self.path = Path(path)
        self.server = server   # a StreamServer: its sessions' playout figures go into each record
        self.every_s = every_s
        self._pauses = GcPauses()
        self._task: asyncio.Task | None = None
        self._lag: asyncio.Task | None = None
        self._worst_lag = 0.0
        self._prev_types: collections.Counter | None = None
        self._prev_snapshot = None
        self._t0 = time.monotonic()

    @classmethod
    def from_env(cls, server=None) -> "Diagnostics | None":
        value = os.environ.get(ENV)
        if not value:
            return None
        path, sep, every = value.rpartition(":")
        try:
            return cls(path, float(every), server) if sep else cls(value, server=server)
        except ValueError:
            return cls(value, server=server)

    def start(self) -> None:
        gc.callbacks.append(self._pauses)
        self._task = asyncio.create_task(self._run(), name="diagnostics")
        self._lag = asyncio.create_task(self._watch_lag(), name="diagnostics-lag")
        log.warning("diagnostics on: a record every %g s to %s (costs CPU: for debugging only)", self.every_s,
                    self.path)

    async def stop(self) -> None:
        for task in (self._task, self._lag):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._task, self._lag) if t is not None), return_exceptions=True)
        if self._pauses in gc.callbacks:
            gc.callbacks.remove(self._pauses)

    async def _watch_lag(self) -> None:
        """How late a 20 ms sleep wakes: the event loop's worst stall per record."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.02)
            self._worst_lag = max(self._worst_lag, time.perf_counter() - t - 0.02)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                record = self.record()
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except Exception:
                log.exception("diagnostics record failed")

    def record(self) -> dict:
        pauses = self._pauses.take()
        t_walk = time.perf_counter()
        # a full collection first: what is counted is alive, not cyclic garbage waiting for the collector
        self._pauses.muted = True
        try:
            unreachable = gc.collect()
        finally:
            self._pauses.muted = False
        types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        walk_ms = 1000 * (time.perf_counter() - t_walk)
        grew = []
        if self._prev_types is not None:
            diff = types.copy()
            diff.subtract(self._prev_types)
            grew = [(k, v) for k, v in diff.most_common(15) if v > 0]
        self._prev_types = types
        record = {
            "t_s": round(time.monotonic() - self._t0, 1), "rss_mib": rss_mib(), "heap_mib": heap_mib(),
            "gc_objects": sum(types.values()), "gc_frozen": gc.get_freeze_count(), "gc_unreachable_found": unreachable, "walk_ms": round(walk_ms, 1),
            "watched": {k: types[k] for k in WATCHED if types.get(k)}, "grew": grew,
            "tasks": task_summary(), "threads": threading.active_count(),
            "loop_worst_lag_ms": round(1000 * self._worst_lag, 1), "gc_pauses": pauses,
        }
        self._worst_lag = 0.0
        closed = [o for o in gc.get_objects() if type(o).__name__ == "ServerSession" and getattr(o, "closed", False)]
        if closed:   # a closed session still alive after a full collection: who holds it
            record["closed_sessions_alive"] = len(closed)
            record["closed_session_held_by"] = holders(closed[0], ignore=(closed,))
        del closed
        from server.sessions import SWEEPS

        record["sweeps"] = {k: round(v, 1) for k, v in SWEEPS.items()}   # the full collections after closes
        sessions = getattr(self.server, "sessions", None)
        if sessions is not None:
            record["sessions"] = [{"id": s.id, "kind": s.kind, "age_s": round(time.time() - s.created),
                                   **{k: v for k, v in s.playout.stats().items() if k in PLAYOUT_KEYS}}
                                  for s in sessions.all()]
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            record["tracemalloc_mib"] = round(current / (1 << 20), 1)
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")])
            if self._prev_snapshot is not None:
                record["tracemalloc_grew"] = [
                    (str(s.traceback[0]), round(s.size_diff / 1024, 1), s.count_diff)
                    for s in snap.compare_to(self._prev_snapshot, "lineno")[:15] if s.size_diff > 0]
            self._prev_snapshot = snap
        return record


def holders(obj, depth: int = 6, ignore: tuple = ()) -> list[str]:
    """One chain of referrers from obj outwards (type names, dict keys where found): enough to name a leak.
    `ignore`: the caller's own containers that hold obj."""
    chain: list[str] = []
    seen = {id(obj)}
    ignore_ids = {id(chain), *(id(x) for x in ignore)}
    frame = sys._getframe()
    for _ in range(depth):
        refs = [r for r in gc.get_referrers(obj) if id(r) not in seen and id(r) not in ignore_ids
                and not isinstance(r, type(frame))]
        ignore_ids.add(id(refs))
        if not refs:
            break
        # prefer a holder that is not a bare dict/list (those are someone's attributes or containers)
        r = next((x for x in refs if not isinstance(x, (dict, list, tuple, set))), refs[0])
        what = type(r).__qualname__
        if isinstance(r, dict):
            key = None
            for k, v in r.items():   # a loop, not a generator: a closure over obj would be one more holder
                if v is obj:
                    key = k
                    break
            what += f"[{key!r}]" if key is not None else f"(len {len(r)})"
        elif hasattr(r, "__qualname__"):
            what += f" {r.__qualname__}"
        elif isinstance(r, asyncio.Task):
            what += f" {r.get_name()}"
        chain.append(f"{what} (+{len(refs) - 1} other)" if len(refs) > 1 else what)
        seen.add(id(r))
        obj = r
    return chain


def task_summary() -> dict:
    """Live asyncio tasks by coroutine name (for a record taken by hand)."""
    return dict(collections.Counter(getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks()))


