"""Server-side sessions: one engine session + its playout + the peers watching it; capacity, idle timeout, cleanup."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from typing import Any, Callable

from emo_stream.errors import EmoStreamError
from emo_stream.streaming import AvatarHandle, EngineFullError, StreamingEngine, StreamSession

from server import protocol
from server.allocator import glibc_function
from server.config import ServerConfig
from server.sync import Clock, Playout

log = logging.getLogger(__name__)


class ServerBusyError(EmoStreamError):
    """All session slots are taken."""


class ServerSession:
    """A live avatar session as the server sees it.

    The connection that started it owns it (closing that connection closes the session); any
    number of viewers subscribe to its playout. Playback events and the end of the session are
    forwarded to listeners (WebSocket outboxes).
    """

    def __init__(self, engine_session: StreamSession, config: ServerConfig, clock: Clock, kind: str):
        self.id: str = str(getattr(engine_session, "id", "") or uuid.uuid4().hex[:12])
        self.kind = kind
        self.engine_session = engine_session
        self.config = config
        self.clock = clock
        self.created = time.time()
        self.last_input = clock.now()
        self.audio_seconds_in = 0.0
        self.mic_dropped_s = 0.0
        self.viewers = 0
        self.closed = False
        self.close_reason: str | None = None
        self._listeners: list[Callable[[dict], None]] = []
        self._peers: set[Any] = set()
        self._tasks: set[asyncio.Task] = set()
        self.playout = Playout(engine_session.frames(), config.fps, clock,
                               late_tolerance_s=config.playout.late_tolerance_s, on_event=self._dispatch,
                               live_input=kind in ("webrtc", "whip"), queue_depth=self._engine_queue_depth)
        self._playout_task: asyncio.Task | None = asyncio.create_task(self._run_playout(), name=f"playout-{self.id}")

    # -- events ----------------------------------------------------------------------------------
    def add_listener(self, fn: Callable[[dict], None]) -> None:
        if fn not in self._listeners:  # a connection viewing a session twice still gets each event once
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[dict], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _dispatch(self, event: dict) -> None:
        event = {**event, "session": self.id}
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:
                log.exception("session %s: event listener failed", self.id)

    # -- peers and tasks tied to the session's life ------------------------------------------------
    def add_peer(self, pc: Any) -> None:
        self._peers.add(pc)

    async def remove_peer(self, pc: Any) -> None:
        if pc in self._peers:
            self._peers.discard(pc)
            await _close_quietly(pc)

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: task %s failed: %r", self.id, task.get_name(), task.exception())

    async def _run_playout(self) -> None:
        try:
            await self.playout.run()
        except asyncio.CancelledError:
            raise
        except EmoStreamError as exc:   # the engine failed this session (backend error, broken device, stall)
            log.error("session %s: %s", self.id, exc)
            self._dispatch(protocol.error("generation_failed", str(exc), fatal=True))
        except Exception:
            log.exception("session %s: playout failed", self.id)
            self._dispatch(protocol.error("internal", "the session's playout failed", fatal=True))

    def _engine_queue_depth(self) -> int:
        return self.engine_session.output_queue_frames

    # -- input -----------------------------------------------------------------------------------
    def received(self, seconds: float) -> None:
        """Audio arrived from the client (counted on arrival, before any backpressure wait)."""
        self.last_input = self.clock.now()
        self.audio_seconds_in += seconds

    async def push_audio(self, pcm, sample_rate: int, channels: int) -> None:
        self.last_input = self.clock.now()
        await self.engine_session.push_audio(pcm, sample_rate=sample_rate, channels=channels)
        self.last_input = self.clock.now()

    def end_of_speech(self) -> None:
        self.last_input = self.clock.now()
        self.engine_session.end_of_speech()

    def clear(self) -> None:
        self.last_input = self.clock.now()
        self.engine_session.clear()
        self.playout.clear()

    def input_backlog_s(self) -> float:
        try:
            return self.engine_session.input_backlog_s
        except Exception:
            return 0.0

    # -- state -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        try:
            engine = dict(self.engine_session.stats())
        except Exception as exc:  # stats must never take the page down
            engine = {"error": repr(exc)}
        return {
            "session": self.id,
            "kind": self.kind,
            "age_s": round(time.time() - self.created, 1),
            "viewers": self.viewers,
            "peers": len(self._peers),
            "audio_in_s": round(self.audio_seconds_in, 2),
            "mic_dropped_s": round(self.mic_dropped_s, 2),
            **engine,
            "playout": self.playout.stats(),
        }

    async def close(self, reason: str = "closed") -> None:
        """Idempotent: closes peers, the engine session (ending the playout) and every task."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("session %s closed (%s)", self.id, reason)
        for pc in list(self._peers):
            await _close_quietly(pc)
        self._peers.clear()
        try:
            await asyncio.wait_for(self.engine_session.close(), timeout=1.5)
        except Exception:
            log.exception("session %s: engine session close failed", self.id)
        assert self._playout_task is not None
        self._playout_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._playout_task, *self._tasks, return_exceptions=True)
        self._dispatch(protocol.session_ended(reason))
        self._listeners.clear()
        self._break_cycles()

    def _break_cycles(self) -> None:
        """A closed session must go with its last reference (reference counting), not wait for the cyclic
        collector: its playout calls back into it (on_event, queue_depth) and its finished playout task keeps
        the cancelled coroutine's frame (which holds self) in its exception. A full collection comes rarely in
        a server with a large heap, and meanwhile each closed session kept its frames, audio and engine
        session (the hour at capacity grew 53 MiB)."""
        self.playout.on_event = None
        self.playout._queue_depth = None
        self._playout_task = None   # close() is idempotent: never used again
        self._tasks.clear()


async def _close_quietly(pc: Any) -> None:
    try:
        await asyncio.wait_for(pc.close(), timeout=1.0)
    except Exception:
        log.debug("peer close failed", exc_info=True)
    collect_soon()


_SWEEP_DELAY_S = 2.0
_sweep: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None


def collect_soon() -> None:
    """A full garbage collection a moment from now (once for closes that come together).

    aiortc's peer connections are reference cycles (their transports call back into them), so a closed one
    (its codecs, jitter buffers, bitrate estimator: thousands of objects and native buffers) is freed only by
    the collector's full pass. In this server that pass came about once in ten minutes or never (few
    container allocations per second, a large heap: Python's 25% rule), so memory grew with every session
    of the hour at capacity. serve freezes what exists at startup (gc.freeze), so the pass walks only what
    serving allocated: a few milliseconds, not the ~130 ms of a full heap."""
    global _sweep
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    # one pending pass per loop; a pass left pending on a loop that has since closed (a server stopped, a
    # test's loop) never runs, so it must not block the passes of the loop running now
    if _sweep is not None and _sweep[0] is loop and not _sweep[1].cancelled():
        return
    _sweep = (loop, loop.call_later(_SWEEP_DELAY_S, _collect))


def _collect() -> None:
    global _sweep
    _sweep = None
    t = time.perf_counter()
    found = gc.collect()
    ms = 1000 * (time.perf_counter() - t)
    SWEEPS["n"] += 1
    SWEEPS["found"] += found
    SWEEPS["total_ms"] += ms
    SWEEPS["max_ms"] = max(SWEEPS["max_ms"], ms)
    log.debug("garbage collection after closes: %d objects, %.1f ms", found, ms)
    if _malloc_trim is not None:
        # what the pass freed stays in glibc's arenas (the hour at capacity: heap in use flat near 50 MiB, held
        # free memory 37 -> 68 MiB); trimming gives their free pages back, off the loop (it walks every arena)
        asyncio.get_running_loop().run_in_executor(None, _trim)


_malloc_trim = glibc_function("malloc_trim")   # None off glibc: the allocator is left as it is


def _trim() -> None:
    t = time.perf_counter()
    released = _malloc_trim(0)
    SWEEPS["trims"] += 1
    SWEEPS["trimmed"] += int(bool(released))
    SWEEPS["trim_max_ms"] = max(SWEEPS["trim_max_ms"], 1000 * (time.perf_counter() - t))


# what the sweeps cost (server/diagnostics.py)
SWEEPS = {"n": 0, "found": 0, "total_ms": 0.0, "max_ms": 0.0, "trims": 0, "trimmed": 0, "trim_max_ms": 0.0}


class SessionManager:
    """Opens sessions up to the configured capacity, finds them by id, reaps idle ones."""

    def __init__(self, engine: StreamingEngine, config: ServerConfig, clock: Clock):
        self.engine = engine
        self.config = config
        self.clock = clock
        self._sessions: dict[str, ServerSession] = {}
        self._opening = 0
        self._reaper: asyncio.Task | None = None
        self.opened_total = 0
        self.busy_total = 0

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="session-reaper")

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> ServerSession | None:
        if session_id == "latest":
            return self.latest()
        return self._sessions.get(session_id)

    def latest(self) -> ServerSession | None:
        return max(self._sessions.values(), key=lambda s: s.created, default=None)

    def all(self) -> list[ServerSession]:
        return list(self._sessions.values())

    async def open(self, avatar: AvatarHandle, *, seed: int = 0, kind: str = "ws") -> ServerSession:
        limit = self.config.sessions.max_sessions
        if len(self._sessions) + self._opening >= limit:
            self.busy_total += 1
            raise ServerBusyError(f"server busy: all {limit} session slots are in use; try again later")
        self._opening += 1
        try:
            engine_session = self.engine.open_session(avatar, seed=seed)
        except EngineFullError as exc:
            self.busy_total += 1
            raise ServerBusyError(f"server busy: {exc}") from None
        finally:
            self._opening -= 1
        session = ServerSession(engine_session, self.config, self.clock, kind)
        self._sessions[session.id] = session
        self.opened_total += 1
        log.info("session %s opened (%s); %d active", session.id, kind, len(self._sessions))
        return session

    async def close(self, session: ServerSession, reason: str) -> None:
        self._sessions.pop(session.id, None)
        await session.close(reason)
        collect_soon()

    async def close_all(self, reason: str = "server stopping") -> None:
        if self._reaper:
            self._reaper.cancel()
        await asyncio.gather(*(self.close(s, reason) for s in self.all()), return_exceptions=True)

    async def _reap(self) -> None:
        timeout = self.config.sessions.idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = self.clock.now()
            for session in [s for s in self.all() if now - s.last_input > timeout]:
                await self.close(session, f"idle for {timeout:g} s")
            session = None  # hold no closed session between rounds
