"""The worker's one StreamingEngine, shared by jobs that each run on their own thread and event loop.

livekit-agents' THREAD executor runs every job (room) in its own thread with its own asyncio loop, so
all rooms of one GPU batch together in one engine. The engine is started on the worker's main loop;
each job opens its session on its own loop (the engine accepts sessions from any loop).

Capacity is counted in slots: `reserve()` when a job is accepted (so two rooms arriving at once cannot
both take the last place), `release()` when its session is closed or it never got one. `load` = taken
slots / capacity is what the worker reports to LiveKit. No livekit import here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import numpy as np

from emo_stream.portrait_pool import PortraitPool
from emo_stream.streaming import AvatarHandle, EngineConfig, StreamingEngine, StreamSession
from emo_stream.streaming.avatars import SourceIndex

log = logging.getLogger(__name__)


class EngineHost:
    """The engine plus thread-safe slot accounting and a portrait-source -> prepared-avatar map."""

    def __init__(self, engine: StreamingEngine, pool: PortraitPool | None = None) -> None:
        self.engine = engine
        # portraits from dispatch metadata, URLs and files are decoded in its processes (workers start
        # with the first image); stop() ends them
        self.pool = pool if pool is not None else PortraitPool()
        self.config: EngineConfig = engine.config
        self.capacity = self.config.max_sessions
        self._lock = threading.Lock()
        self._taken = 0
        self._sources = SourceIndex(engine.avatar, 4 * self.config.max_avatars)   # URL / digest / name

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()
        self.pool.close()

    @property
    def fps(self) -> int:
        return self.engine.fps

    @property
    def size(self) -> int:
        return int(self.engine.frame_size)

    # ------------------------------------------------------------------ capacity

    @property
    def healthy(self) -> bool:
        """False once the engine's device failed or a call on it hangs (emo_stream.streaming.faults)."""
        return self.engine.health.healthy

    @property
    def load(self) -> float:
        """Taken slots / capacity: 0.0 idle, 1.0 full; 1.0 too while the engine is unhealthy, so LiveKit sends no
        more rooms here."""
        if not self.healthy:
            return 1.0
        with self._lock:
            return self._taken / self.capacity

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.capacity - self._taken

    def reserve(self) -> bool:
        """Take a slot for a job about to start; False when the worker is full or its engine unhealthy."""
        if not self.healthy:
            return False
        with self._lock:
            if self._taken >= self.capacity:
                return False
            self._taken += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._taken <= 0:
                raise RuntimeError("EngineHost.release() without a reserved slot")
            self._taken -= 1

    # ------------------------------------------------------------------ from a job's loop

    async def prepare_avatar(self, key: str, load: Callable[[], np.ndarray]) -> AvatarHandle:
        """The prepared avatar for `key` (a URL, a content digest, a name): loaded (downloaded, decoded)
        and prepared once per worker; the engine shares one preparation per photo across all jobs."""
        handle = self._sources.lookup(key)
        if handle is not None:
            return handle
        image = await asyncio.to_thread(load)
        handle = await self.engine.prepare_avatar(image)
        self._sources.remember(key, handle)
        return handle

    def open_session(self, avatar: AvatarHandle, seed: int = 0) -> StreamSession:
        """A session bound to the calling loop (the job's), on a slot taken with reserve()."""
        return self.engine.open_session(avatar, seed=seed)
