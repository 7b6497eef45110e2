"""Avatars the server can animate: the default portrait plus uploads.

Prepared avatars live in one place, the engine's cache (emo_stream.streaming.avatars): this module only
checks and decodes uploads and remembers which upload bytes gave which avatar id, so a repeated upload
skips decoding."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging

import numpy as np

from emo_stream.errors import ImageInputError
from emo_stream.media import image_from_bytes
from emo_stream.streaming import AvatarHandle, StreamingEngine, UnknownAvatarError
from emo_stream.streaming.avatars import SourceIndex

log = logging.getLogger(__name__)

# uploads are decoded no larger than this (longer side): enough to find a face in a group photo and crop
# it at the model's 512 px, without a 5000x5000 upload costing gigabytes and a stall
DECODE_MAX_SIDE = 2048
PREPARING_AT_ONCE = 2  # uploads decoded/prepared concurrently; more wait their turn (the model is shared)

__all__ = ["AvatarStore", "UnknownAvatarError"]


class AvatarStore:
    """Upload bytes -> avatar id (prepared in the engine's cache); ids -> the engine's AvatarHandle."""

    def __init__(self, engine: StreamingEngine, max_avatars: int = 16, max_pixels: int = 25_000_000):
        self.engine = engine
        self.max_avatars = max_avatars   # upload digests remembered (the engine bounds the prepared ones)
        self._by_digest = SourceIndex(lambda avatar_id: self.engine.avatar(avatar_id), max_avatars)
        self.max_pixels = max_pixels
        self.default: AvatarHandle | None = None
        self._slots = asyncio.Semaphore(PREPARING_AT_ONCE)  # heavy: decode, face analysis, reference features

    async def set_default(self, image: np.ndarray) -> AvatarHandle:
        self.default = await self.engine.prepare_avatar(image)
        return self.default

    async def add(self, data: bytes) -> str:
        """Upload bytes -> avatar id. Raises ImageInputError / NoFaceError with a user-facing message."""
        async with self._slots:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())  # 8 MB: off the loop
            known = self._by_digest.lookup(digest)
            if known is not None:
                return known.id
            image = await asyncio.to_thread(self._decode, data)
            try:
                handle = await self.engine.prepare_avatar(image)
            finally:
                del image
                await asyncio.to_thread(_give_back_memory)
            self._by_digest.remember(digest, handle)
            log.info("avatar %s prepared (%d cached)", handle.id, len(self.engine.avatars))
            return handle.id

    def get(self, avatar_id: str | None) -> AvatarHandle:
        """The default avatar (None) or a prepared one; UnknownAvatarError when the engine has none by that id."""
        if avatar_id is None:
            return self.default
        return self.engine.avatar(avatar_id)

    def _decode(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only: refuse bombs before decoding
                width, height = img.size
        except Image.DecompressionBombError:  # PIL's own guard, far above max_pixels: same answer
            raise ImageInputError(f"avatar: the image is too large (limit {self.max_pixels} pixels)") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise ImageInputError("avatar: not a readable image") from None
        if width * height > self.max_pixels:
            raise ImageInputError(f"avatar: {width}x{height} is too large (limit {self.max_pixels} pixels)")
        if min(width, height) < 64:
            raise ImageInputError(f"avatar: {width}x{height} is too small (at least 64 pixels a side)")
        return image_from_bytes(data, DECODE_MAX_SIDE)


def _give_back_memory() -> None:
    """Decoding and preparing touch large temporary buffers in worker threads; glibc keeps freed memory in
    per-thread arenas, so hand it back to the system (Linux/glibc only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
