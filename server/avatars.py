"""Avatars the server can animate: the default portrait plus uploads, each prepared once and cached."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import logging
from typing import Any

import numpy as np

from emo_stream.errors import ImageInputError
from emo_stream.media import image_from_bytes

log = logging.getLogger(__name__)


class UnknownAvatarError(ImageInputError):
    """An avatar id that was never uploaded here (or was evicted)."""


class AvatarStore:
    """Prepared avatars by id (LRU-bounded); uploads of the same bytes reuse the prepared avatar."""

    def __init__(self, engine: Any, max_avatars: int = 16, max_pixels: int = 25_000_000):
        self.engine = engine
        self.max_avatars = max_avatars
        self.max_pixels = max_pixels
        self.default: Any = None
        self._by_id: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._by_digest: dict[str, str] = {}
        self._lock = asyncio.Lock()  # one preparation at a time: it is heavy (face analysis, reference features)

    async def set_default(self, image: np.ndarray) -> Any:
        self.default = await self.engine.prepare_avatar(image)
        return self.default

    async def add(self, data: bytes) -> str:
        """Upload bytes -> avatar id. Raises ImageInputError / NoFaceError with a user-facing message."""
        digest = hashlib.sha256(data).hexdigest()
        async with self._lock:
            known = self._by_digest.get(digest)
            if known in self._by_id:
                self._by_id.move_to_end(known)
                return known
            image = await asyncio.to_thread(self._decode, data)
            handle = await self.engine.prepare_avatar(image)
            avatar_id = str(getattr(handle, "id", digest[:16]))
            self._by_id[avatar_id] = handle
            self._by_id.move_to_end(avatar_id)
            self._by_digest[digest] = avatar_id
            while len(self._by_id) > self.max_avatars:
                old, _ = self._by_id.popitem(last=False)
                self._by_digest = {d: i for d, i in self._by_digest.items() if i != old}
            log.info("avatar %s prepared (%d cached)", avatar_id, len(self._by_id))
            return avatar_id

    def get(self, avatar_id: str | None) -> Any:
        if avatar_id is None:
            return self.default
        handle = self._by_id.get(avatar_id)
        if handle is None:
            raise UnknownAvatarError(f"unknown avatar {avatar_id!r}: upload it first (it may have been evicted)")
        self._by_id.move_to_end(avatar_id)
        return handle

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
        return image_from_bytes(data)
