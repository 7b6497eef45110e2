"""Avatars the server can animate: the default portrait plus uploads.

Prepared avatars live in one place, the engine's cache (emo_stream.streaming.avatars): this module has
uploads decoded (in emo_stream.portrait_pool's worker processes) and remembers which upload bytes gave
which avatar id, so a repeated upload skips decoding."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from emo_stream.errors import EmoStreamError
from emo_stream.media import PORTRAIT_MAX_SIDE
from emo_stream.portrait_pool import PortraitPool
from emo_stream.streaming import AvatarHandle, StreamingEngine, UnknownAvatarError
from emo_stream.streaming.avatars import AvatarCacheFullError, SourceIndex

log = logging.getLogger(__name__)

PREPARING_AT_ONCE = 2  # uploads prepared concurrently after decoding; more wait their turn (the model is shared)
MIN_SIDE = 64          # pixels: smaller uploads cannot hold a face the models can use

__all__ = ["AvatarCacheFullError", "AvatarStore", "UnknownAvatarError", "UploadRateError"]


class AvatarStore:
    """Upload bytes -> avatar id (prepared in the engine's cache); ids -> the engine's AvatarHandle.

    Upload bytes are decoded (and their face found) in `pool`'s worker processes, never in this one."""

    def __init__(self, engine: StreamingEngine, max_avatars: int = 16, max_pixels: int = 25_000_000,
                 pool: PortraitPool | None = None, uploads_per_minute: float = 12.0):
        self.engine = engine
        self.max_avatars = max_avatars   # upload digests remembered (the engine bounds the prepared ones)
        self._by_digest = SourceIndex(lambda avatar_id: self.engine.avatar(avatar_id), max_avatars)
        self.max_pixels = max_pixels
        self.default: AvatarHandle | None = None
        self.pool = pool if pool is not None else PortraitPool()
        self._slots = asyncio.Semaphore(PREPARING_AT_ONCE)  # face analysis done: reference features
        self.rate = UploadRate(uploads_per_minute)

    async def set_default(self, image: np.ndarray) -> AvatarHandle:
        self.default = await self.engine.prepare_avatar(image)
        return self.default

    async def add(self, data: bytes, owner: str | None = None, address: str | None = None) -> str:
        """Upload bytes -> avatar id, held by `owner` (a connection: nobody else's uploads can drop it while
        it stays). Raises ImageInputError / NoFaceError with a user-facing message, UploadRateError past
        uploads_per_minute from `address`, PortraitPoolBusy when too many uploads are being decoded at once
        and AvatarCacheFullError when every place is held by connected clients."""
        if address is not None:
            self.rate.take(address)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())  # 8 MB: off the loop
        known = self._by_digest.lookup(digest)
        if known is not None:
            self.engine.avatars.claim(known.id, owner)
            return known.id
        if not self.engine.avatars.has_room(owner):   # before the costly decoding
            raise AvatarCacheFullError(self.engine.avatars._full_message())
        decoded = await self.pool.decode_async(data, what="avatar", max_side=PORTRAIT_MAX_SIDE,
                                               max_pixels=self.max_pixels, min_side=MIN_SIDE)
        async with self._slots:
            try:
                handle = await self.engine.prepare_avatar(decoded.image, owner)
            finally:
                del decoded
                await asyncio.to_thread(_give_back_memory)
        self._by_digest.remember(digest, handle)
        log.info("avatar %s prepared (%d cached)", handle.id, len(self.engine.avatars))
        return handle.id

    def release(self, owner: str) -> None:
        """The owner's connection closed: its avatars may be dropped again (least recently used first)."""
        cache = getattr(self.engine, "avatars", None)
        if cache is not None:
            cache.release(owner)

    def get(self, avatar_id: str | None) -> AvatarHandle:
        """The default avatar (None) or a prepared one; UnknownAvatarError when the engine has none by that id."""
        if avatar_id is None:
            return self.default
        return self.engine.avatar(avatar_id)


class UploadRateError(EmoStreamError):
    """Too many uploads from one client address."""


class UploadRate:
    """Uploads per minute per client address (a token bucket: `per_minute` at once, then one every
    60/per_minute s). Bounded: the least recently seen addresses are forgotten beyond MAX_ADDRESSES."""

    MAX_ADDRESSES = 4096

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # address -> (tokens, when)

    def take(self, address: str) -> None:
        now = self.clock()
        tokens, when = self._buckets.pop(address, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - when) * self.per_minute / 60.0)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            wait = (1.0 - tokens) * 60.0 / self.per_minute
            raise UploadRateError(f"avatar: too many uploads from {address} (limit {self.per_minute:g} a minute); "
                                  f"try again in {wait:.0f} s")
        self._buckets[address] = (tokens - 1.0, now)
        while len(self._buckets) > self.MAX_ADDRESSES:
            self._buckets.popitem(last=False)


def _give_back_memory() -> None:
    """Decoding and preparing touch large temporary buffers in worker threads; glibc keeps freed memory in
    per-thread arenas, so hand it back to the system (Linux/glibc only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
