"""The engine's prepared avatars: one cache for every user of the engine (server uploads included).

Keyed by the portrait's content, so every session with the same photo shares one prepared avatar (its
reference features); least recently used ones beyond `max_avatars` are dropped unless a session uses
them. Safe from any thread and any event loop: two callers preparing the same photo at once share one
preparation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np

from emo_stream.errors import ImageInputError
from emo_stream.streaming.types import AvatarHandle


def avatar_key(image: np.ndarray) -> str:
    """The content id of an RGB portrait or of a video avatar's frames (also the AvatarHandle id)."""
    digest = hashlib.sha1(repr(image.shape).encode())
    digest.update(memoryview(np.ascontiguousarray(image)).cast("B"))  # no copy of the pixels
    return digest.hexdigest()[:16]


class UnknownAvatarError(ImageInputError, KeyError):
    """An avatar id this engine never prepared (or has dropped)."""

    def __str__(self) -> str:   # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AvatarCache:
    """Prepared avatars by id. `prepare` runs `prepare_fn` in a worker thread, once per distinct image."""

    def __init__(self, prepare_fn: Callable[[np.ndarray], object], max_avatars: int,
                 in_use: Callable[[], Iterable[str]] = lambda: ()) -> None:
        self._prepare_fn = prepare_fn
        self.max_avatars = max_avatars
        self._in_use = in_use
        self._lock = threading.Lock()
        self._avatars: OrderedDict[str, AvatarHandle] = OrderedDict()
        self._pending: dict[str, concurrent.futures.Future] = {}

    def __len__(self) -> int:
        return len(self._avatars)

    async def prepare(self, image: np.ndarray) -> AvatarHandle:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (3, 4) \
                or image.shape[-1] != 3:
            raise ImageInputError("the portrait must be an RGB uint8 array of shape (H, W, 3) (or, for backends "
                                  "that take video avatars, frames (T, H, W, 3))")
        key = await asyncio.to_thread(avatar_key, image)  # hashing a large photo must not stall other sessions
        with self._lock:
            handle = self._avatars.get(key)
            if handle is not None:
                self._avatars.move_to_end(key)
                return handle
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = concurrent.futures.Future()
        if not owner:   # someone (maybe on another loop) is preparing it: share the result
            return await asyncio.shield(asyncio.wrap_future(future))
        try:
            prepared = await asyncio.to_thread(lambda: self._prepare_fn(image.copy()))  # the copy too: off the loop
            handle = AvatarHandle(id=key, avatar=prepared, image_shape=tuple(image.shape))
            with self._lock:
                self._avatars[key] = handle
                self._evict()
            future.set_result(handle)
            return handle
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._pending[key]

    def get(self, avatar_id: str) -> AvatarHandle:
        """A prepared avatar by id (marks it recently used); UnknownAvatarError when absent."""
        with self._lock:
            handle = self._avatars.get(avatar_id)
            if handle is None:
                raise UnknownAvatarError(f"unknown avatar {avatar_id!r}: upload it first (it may have been evicted)")
            self._avatars.move_to_end(avatar_id)
            return handle

    def _evict(self) -> None:
        in_use = set(self._in_use())
        for key in list(self._avatars):
            if len(self._avatars) <= self.max_avatars:
                break
            if key not in in_use:
                del self._avatars[key]


class SourceIndex:
    """Where a portrait came from (an upload's digest, a URL, a name) -> its prepared avatar's id, so a
    repeated source is neither loaded nor decoded again. `find` is the engine's avatar(id) (AvatarCache.get):
    it marks the avatar recently used and raises UnknownAvatarError once it is dropped. LRU-bounded to
    `max_keys`; thread-safe."""

    def __init__(self, find: Callable[[str], AvatarHandle], max_keys: int) -> None:
        self._find = find
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, str] = OrderedDict()

    def lookup(self, key: str) -> AvatarHandle | None:
        """The prepared avatar this source gave, if the cache still holds it (marks both recently used)."""
        with self._lock:
            avatar_id = self._ids.get(key)
            if avatar_id is not None:
                self._ids.move_to_end(key)
        if avatar_id is None:
            return None
        try:
            return self._find(avatar_id)
        except UnknownAvatarError:   # evicted from the cache: the caller prepares it again
            return None

    def remember(self, key: str, handle: AvatarHandle) -> None:
        with self._lock:
            self._ids[key] = handle.id
            self._ids.move_to_end(key)
            while len(self._ids) > self.max_keys:
                self._ids.popitem(last=False)
