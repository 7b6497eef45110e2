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

from emo_stream.errors import EmoStreamError, ImageInputError
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


class AvatarCacheFullError(EmoStreamError):
    """Every cached avatar is in use or held by a connected client: none may be dropped for a new one."""


class AvatarCache:
    """Prepared avatars by id. `prepare` runs `prepare_fn` in a worker thread, once per distinct image.

    Avatars may have owners (a client, e.g. one WebSocket connection): an owned avatar is never dropped
    to make room for someone else's; an owner over `max_per_owner` gives up its own least recently used
    one, and `release(owner)` (the client left) makes its avatars droppable again. Unowned ones (LiveKit
    portraits, the default) are dropped least recently used first; none is dropped while a session uses it."""

    def __init__(self, prepare_fn: Callable[[np.ndarray], object], max_avatars: int,
                 in_use: Callable[[], Iterable[str]] = lambda: (), max_per_owner: int | None = None) -> None:
        self._prepare_fn = prepare_fn
        self.max_avatars = max_avatars
        self.max_per_owner = max_per_owner
        self._in_use = in_use
        self._lock = threading.Lock()
        self._avatars: OrderedDict[str, AvatarHandle] = OrderedDict()
        self._owners: dict[str, set[str]] = {}   # avatar id -> the owners holding it
        self._pending: dict[str, concurrent.futures.Future] = {}

    def __len__(self) -> int:
        return len(self._avatars)

    async def prepare(self, image: np.ndarray, owner: str | None = None) -> AvatarHandle:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (3, 4) \
                or image.shape[-1] != 3:
            raise ImageInputError("the portrait must be an RGB uint8 array of shape (H, W, 3) (or, for backends "
                                  "that take video avatars, frames (T, H, W, 3))")
        key = await asyncio.to_thread(avatar_key, image)  # hashing a large photo must not stall other sessions
        with self._lock:
            handle = self._avatars.get(key)
            if handle is not None:
                self._avatars.move_to_end(key)
                self._own(key, owner)
                return handle
            if owner is not None and not self._has_room(owner):
                raise AvatarCacheFullError(self._full_message())
            future = self._pending.get(key)
            preparing = future is None
            if preparing:
                future = self._pending[key] = concurrent.futures.Future()
        if not preparing:   # someone (maybe on another loop) is preparing it: share the result
            handle = await asyncio.shield(asyncio.wrap_future(future))
            self.claim(handle.id, owner)
            return handle
        try:
            prepared = await asyncio.to_thread(lambda: self._prepare_fn(image.copy()))  # the copy too: off the loop
            handle = AvatarHandle(id=key, avatar=prepared, image_shape=tuple(image.shape))
            with self._lock:
                self._avatars[key] = handle
                self._own(key, owner)
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

    def has_room(self, owner: str | None) -> bool:
        """Whether `owner` may add an avatar now (checked before the costly decoding, and again at prepare)."""
        with self._lock:
            return owner is None or self._has_room(owner)

    def claim(self, avatar_id: str, owner: str | None) -> None:
        """`owner` holds this cached avatar too (it uploaded the same picture)."""
        with self._lock:
            if avatar_id in self._avatars:
                self._own(avatar_id, owner)

    def release(self, owner: str) -> None:
        """The owner is gone (its connection closed): its avatars may be dropped again, least recent first."""
        with self._lock:
            for key in [k for k, owners in self._owners.items() if owner in owners]:
                self._owners[key].discard(owner)
                if not self._owners[key]:
                    del self._owners[key]
            self._evict()

    def owned_by(self, owner: str) -> list[str]:
        with self._lock:
            return [k for k in self._avatars if owner in self._owners.get(k, ())]

    def _own(self, key: str, owner: str | None) -> None:
        if owner is None or owner in self._owners.get(key, ()):
            return
        owned = [k for k in self._avatars if owner in self._owners.get(k, ())]   # least recently used first
        if self.max_per_owner is not None and len(owned) >= self.max_per_owner:
            oldest = owned[0]   # over its quota: the owner lets go of its own oldest, never another's
            self._owners[oldest].discard(owner)
            if not self._owners[oldest]:
                del self._owners[oldest]
        self._owners.setdefault(key, set()).add(owner)

    def _has_room(self, owner: str) -> bool:
        if len(self._avatars) + len(self._pending) < self.max_avatars:
            return True
        owned = sum(1 for k in self._avatars if owner in self._owners.get(k, ()))
        if self.max_per_owner is not None and owned >= self.max_per_owner:
            return True   # it gives one of its own up
        in_use = set(self._in_use())
        return any(k not in in_use and not self._owners.get(k) for k in self._avatars)

    def _full_message(self) -> str:
        return (f"all {self.max_avatars} avatar places are held by connected clients or in use; try again later "
                f"(an avatar is kept while the client that uploaded it stays connected)")

    def _evict(self) -> None:
        in_use = set(self._in_use())
        for key in list(self._avatars):
            if len(self._avatars) <= self.max_avatars:
                break
            if key not in in_use and not self._owners.get(key):
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
