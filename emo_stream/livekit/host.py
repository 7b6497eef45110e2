"""One StreamingEngine per worker process, shared by jobs that each run on their own event loop.

A LiveKit worker runs every job (room) in its own thread with its own asyncio loop, so that all rooms
of one GPU batch together in one engine. The engine and its sessions live on one loop of their own
(a dedicated thread); jobs reach them only through this module, which hands every call over with
`asyncio.run_coroutine_threadsafe` / `call_soon_threadsafe`. No livekit import here.

Capacity is counted in slots: `reserve()` when a job is accepted (so two rooms arriving at once
cannot both take the last place), `open_session()` consumes the reservation, closing the session or
`release()` gives it back. `load` = taken slots / capacity is what the worker reports to LiveKit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from emo_stream.streaming import AvatarHandle, EngineConfig, EngineFullError, OutputFrame, StreamingEngine

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineHost:
    """Owns the engine and the loop thread it runs on; thread-safe slot accounting for the worker."""

    def __init__(self, engine: StreamingEngine) -> None:
        """`engine`: not started yet; start() starts it on the host's own loop."""
        self.engine = engine
        self.config: EngineConfig = engine.config
        self.capacity = self.config.max_sessions
        self._lock = threading.Lock()
        self._taken = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._avatars: dict[str, concurrent.futures.Future] = {}

    # ------------------------------------------------------------------ lifecycle (any thread)

    def start(self) -> None:
        """Start the engine loop thread and the engine on it; returns when the engine is running."""
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="emo-stream-engine-loop", daemon=True)
        self._thread.start()
        ready.wait()
        self._submit(self.engine.start()).result()

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            self._submit(self.engine.stop()).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def fps(self) -> int:
        return self.engine.fps

    @property
    def size(self) -> int:
        return int(self.engine.backend.size)

    # ------------------------------------------------------------------ capacity

    @property
    def load(self) -> float:
        """Taken slots / capacity: 0.0 idle, 1.0 full."""
        with self._lock:
            return self._taken / self.capacity

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.capacity - self._taken

    def reserve(self) -> bool:
        """Take a slot for a job about to start; False when the worker is full."""
        with self._lock:
            if self._taken >= self.capacity:
                return False
            self._taken += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._taken = max(0, self._taken - 1)

    # ------------------------------------------------------------------ calls from a job's loop

    def _submit(self, coro: Awaitable[T]) -> concurrent.futures.Future:
        if self._loop is None:
            raise RuntimeError("EngineHost is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn()` (a coroutine function) on the engine loop and await its result from this loop."""
        return await asyncio.wrap_future(self._submit(fn()))

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run a plain function on the engine loop, without waiting (e.g. session.clear)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn)

    async def prepare_avatar(self, key: str, load: Callable[[], np.ndarray]) -> AvatarHandle:
        """The prepared avatar for `key` (a URL or digest), loading and preparing it once per worker:
        concurrent jobs asking for the same key share one preparation."""
        with self._lock:
            fut = self._avatars.get(key)
            if fut is None or (fut.done() and fut.exception() is not None):
                async def prepare() -> AvatarHandle:
                    image = await asyncio.to_thread(load)
                    return await self.engine.prepare_avatar(image)

                fut = self._submit(prepare())
                self._avatars[key] = fut
                while len(self._avatars) > self.config.max_avatars:   # bounded: oldest entry goes
                    self._avatars.pop(next(iter(self._avatars)))
        return await asyncio.wrap_future(fut)

    async def open_session(self, avatar: AvatarHandle, seed: int = 0) -> "HostedSession":
        """Open a session on a slot taken with reserve(). Raises EngineFullError if the engine is full."""
        async def open_() -> Any:
            return self.engine.open_session(avatar, seed=seed)

        try:
            session = await self.call(open_)
        except EngineFullError:
            raise
        return HostedSession(self, session)


class HostedSession:
    """A StreamSession used from another event loop: each call runs on the engine loop."""

    def __init__(self, host: EngineHost, session: Any) -> None:
        self._host = host
        self._session = session
        self.id = session.id
        self.fps = session.fps
        self._closed = False

    async def push_audio(self, pcm: np.ndarray, sample_rate: int, channels: int = 1) -> None:
        await self._host.call(lambda: self._session.push_audio(pcm, sample_rate=sample_rate, channels=channels))

    def end_of_speech(self) -> None:
        self._host.call_soon(self._session.end_of_speech)

    async def clear(self) -> None:
        async def clear_() -> None:
            self._session.clear()

        await self._host.call(clear_)

    async def next_frame(self) -> OutputFrame | None:
        return await self._host.call(self._session.next_frame)

    def stats(self) -> dict:
        return self._session.stats()

    async def close(self) -> None:
        """Idempotent: closes the engine session and gives the worker slot back."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._host.call(self._session.close)
        finally:
            self._host.release()
