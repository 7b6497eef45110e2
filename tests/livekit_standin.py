"""An in-process stand-in for a LiveKit room, for protocol tests without a LiveKit server.

It implements only what livekit-agents' avatar code (DataStreamAudioOutput, DataStreamAudioReceiver,
AvatarRunner, wait_for_participant / wait_for_track_publication) calls on `rtc.Room`: participants and
their events, byte streams (`stream_bytes` / `register_byte_stream_handler`), RPC
(`register_rpc_method` / `perform_rpc`) and track publication. Each room belongs to the event loop it
connected from; the hub delivers across loops with call_soon_threadsafe (a worker's job threads each
have their own loop). Published tracks are the SDK's real local tracks: tests read their media back
with rtc.AudioStream / rtc.VideoStream.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from livekit import rtc

_ids = itertools.count(1)


class Hub:
    """The SFU stand-in: which rooms (one per participant) are connected to which room name."""

    def __init__(self) -> None:
        self._rooms: dict[str, list[StandInRoom]] = {}
        self._lock = threading.Lock()

    def peers(self, room: "StandInRoom") -> list["StandInRoom"]:
        with self._lock:
            return [r for r in self._rooms.get(room.name, []) if r is not room]

    def find(self, room_name: str, identity: str) -> "StandInRoom | None":
        with self._lock:
            return next((r for r in self._rooms.get(room_name, []) if r.local_participant.identity == identity),
                        None)

    def join(self, room: "StandInRoom") -> list["StandInRoom"]:
        with self._lock:
            peers = list(self._rooms.get(room.name, []))
            self._rooms.setdefault(room.name, []).append(room)
            return peers

    def leave(self, room: "StandInRoom") -> list["StandInRoom"]:
        with self._lock:
            rooms = self._rooms.get(room.name, [])
            if room in rooms:
                rooms.remove(room)
            return list(rooms)


@dataclass
class _Publication:
    sid: str
    name: str
    kind: int
    source: int
    track: Any = None
    subscribed: bool = True

    async def wait_for_subscription(self) -> None:
        return None


@dataclass
class _StreamInfo:
    stream_id: str
    name: str
    topic: str
    attributes: dict[str, str]
    mime_type: str = "application/octet-stream"
    total_length: int | None = None
    timestamp: int = 0


class _Reader:
    """A byte stream as DataStreamAudioReceiver reads it: `.info` and async iteration over chunks."""

    def __init__(self, info: _StreamInfo) -> None:
        self.info = info
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> "_Reader":
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Writer:
    def __init__(self, sender: "StandInRoom", targets: list["StandInRoom"], info: _StreamInfo) -> None:
        self._sender = sender
        self._targets = targets
        self.info = info
        self._readers: dict[int, _Reader] = {}
        for target in targets:
            target._call(target._open_stream, info, sender.local_participant.identity, self._readers)

    async def write(self, data: bytes) -> None:
        for target in self._targets:
            target._call(self._deliver, id(target), bytes(data))

    def _deliver(self, key: int, data: bytes | None) -> None:
        reader = self._readers.get(key)
        if reader is not None:
            reader._queue.put_nowait(data)

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        for target in self._targets:
            target._call(self._deliver, id(target), None)


class StandInParticipant:
    def __init__(self, identity: str, kind: int, attributes: dict[str, str] | None = None) -> None:
        self.identity = identity
        self.name = identity
        self.sid = f"PA_{next(_ids)}"
        self.kind = kind
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.attributes = dict(attributes or {})
        self.metadata = ""
        self.track_publications: dict[str, _Publication] = {}


class StandInLocalParticipant(StandInParticipant):
    def __init__(self, room: "StandInRoom", identity: str, kind: int, attributes: dict[str, str] | None) -> None:
        super().__init__(identity, kind, attributes)
        self._room = room
        self._rpc_handlers: dict[str, Callable[[rtc.RpcInvocationData], Any]] = {}
        self.rpc_log: list[tuple[str, str, str]] = []     # (method, destination, payload) sent

    def register_rpc_method(self, method: str, handler: Callable[[rtc.RpcInvocationData], Any] | None = None):
        if handler is None:       # decorator form
            def deco(fn):
                self._rpc_handlers[method] = fn
                return fn
            return deco
        self._rpc_handlers[method] = handler
        return handler

    def unregister_rpc_method(self, method: str) -> None:
        self._rpc_handlers.pop(method, None)

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None) -> str:
        self.rpc_log.append((method, destination_identity, payload))
        target = self._room._hub.find(self._room.name, destination_identity)
        if target is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.RECIPIENT_NOT_FOUND, "recipient not found")
        data = rtc.RpcInvocationData(request_id=uuid.uuid4().hex, caller_identity=self.identity,
                                     payload=payload, response_timeout=response_timeout or 10.0, method=method)
        fut = asyncio.run_coroutine_threadsafe(target._handle_rpc(method, data), target._loop)
        return await asyncio.wrap_future(fut)

    async def stream_bytes(self, name: str, *, topic: str = "", destination_identities: list[str] | None = None,
                           attributes: dict[str, str] | None = None, **_: Any) -> _Writer:
        peers = self._room._hub.peers(self._room)
        if destination_identities:
            peers = [p for p in peers if p.local_participant.identity in destination_identities]
        info = _StreamInfo(stream_id=uuid.uuid4().hex, name=name, topic=topic, attributes=dict(attributes or {}))
        return _Writer(self._room, peers, info)

    async def publish_track(self, track: Any, options: Any = None) -> _Publication:
        kind = rtc.TrackKind.KIND_AUDIO if isinstance(track, rtc.LocalAudioTrack) else rtc.TrackKind.KIND_VIDEO
        pub = _Publication(sid=f"TR_{next(_ids)}", name=track.name, kind=kind,
                           source=getattr(options, "source", 0), track=track)
        self.track_publications[pub.sid] = pub
        self._room.published.append(pub)
        self._room.emit("local_track_published", pub, track)
        for peer in self._room._hub.peers(self._room):
            peer._call(peer._remote_published, self.identity, pub)
        return pub

    async def unpublish_track(self, sid: str) -> None:
        self.track_publications.pop(sid, None)

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.attributes.update(attributes)


class StandInRoom(rtc.EventEmitter):
    """What livekit-agents' avatar code uses of rtc.Room, connected through a Hub."""

    def __init__(self, hub: Hub, name: str, identity: str, *,
                 kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
                 attributes: dict[str, str] | None = None) -> None:
        super().__init__()
        self._hub = hub
        self.name = name
        self.local_participant = StandInLocalParticipant(self, identity, kind, attributes)
        self.remote_participants: dict[str, StandInParticipant] = {}
        self.connection_state = rtc.ConnectionState.CONN_DISCONNECTED
        self._byte_handlers: dict[str, Callable[[Any, str], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.published: list[_Publication] = []

    def isconnected(self) -> bool:
        return self.connection_state == rtc.ConnectionState.CONN_CONNECTED

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        peers = self._hub.join(self)
        self.connection_state = rtc.ConnectionState.CONN_CONNECTED
        for peer in peers:
            self._add_remote(peer.local_participant)
            for pub in peer.local_participant.track_publications.values():
                self._remote_published(peer.local_participant.identity, pub)
            peer._call(peer._add_remote, self.local_participant)
        self.emit("connection_state_changed", self.connection_state)

    async def disconnect(self) -> None:
        if not self.isconnected():
            return
        for peer in self._hub.leave(self):
            peer._call(peer._remove_remote, self.local_participant.identity)
        self.connection_state = rtc.ConnectionState.CONN_DISCONNECTED
        self.emit("connection_state_changed", self.connection_state)
        self.emit("disconnected", "CLIENT_INITIATED")

    def register_byte_stream_handler(self, topic: str, handler: Callable[[Any, str], None]) -> None:
        if topic in self._byte_handlers:
            raise ValueError(f"byte stream handler for topic {topic!r} already set")
        self._byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self._byte_handlers.pop(topic, None)

    # ------------------------------------------------------------------ delivery on this room's loop

    def _call(self, fn: Callable, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # loop closed: that participant is gone
            pass

    def _add_remote(self, local: StandInLocalParticipant) -> None:
        remote = StandInParticipant(local.identity, local.kind, local.attributes)
        self.remote_participants[local.identity] = remote
        self.emit("participant_connected", remote)
        self.emit("participant_active", remote)

    def _remove_remote(self, identity: str) -> None:
        remote = self.remote_participants.pop(identity, None)
        if remote is not None:
            self.emit("participant_disconnected", remote)

    def _remote_published(self, identity: str, pub: _Publication) -> None:
        remote = self.remote_participants.get(identity)
        if remote is None:
            return
        mirror = _Publication(sid=pub.sid, name=pub.name, kind=pub.kind, source=pub.source, track=pub.track)
        remote.track_publications[pub.sid] = mirror
        self.emit("track_published", mirror, remote)
        self.emit("track_subscribed", pub.track, mirror, remote)   # everything is auto-subscribed here

    def _open_stream(self, info: _StreamInfo, sender: str, readers: dict[int, _Reader]) -> None:
        handler = self._byte_handlers.get(info.topic)
        if handler is None:
            return
        reader = _Reader(info)
        readers[id(self)] = reader
        handler(reader, sender)

    async def _handle_rpc(self, method: str, data: rtc.RpcInvocationData) -> str:
        handler = self.local_participant._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, f"method {method} not supported")
        result = handler(data)
        if inspect.isawaitable(result):
            result = await result
        return result or ""


@dataclass
class LoopThread:
    """An event loop on its own thread: a worker's job thread."""

    name: str = "job"
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> "asyncio.Future":
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        assert self.thread is not None
        self.thread.join(timeout=10)
        self.loop.close()
