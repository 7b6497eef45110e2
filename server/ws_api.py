"""One WebSocket connection on /api/ws: bots (PCM in, events and optional JPEG frames out), the talk
page (WebRTC signalling, events, stats) and viewers (WebRTC signalling for watching a session).

Reading never blocks on the engine except through the bounded audio queue (backpressure reaches
the client through TCP); everything sent goes through one ordered outbox whose frames are
dropped oldest-first when the client reads slowly (events are never dropped).
"""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

import numpy as np
from websockets.exceptions import ConnectionClosed

from emo_stream.errors import EmoStreamError, ImageInputError
from emo_stream.pcm import float_to_pcm16
from emo_stream.portrait_pool import PortraitPoolBusy
from emo_stream.streaming import EngineUnhealthyError

from server import protocol
from server.protocol import AvatarUpload, ProtocolError, Simple, Start, View
from server.avatars import AvatarCacheFullError, UploadRateError
from server.sessions import ServerBusyError, ServerSession
from server.sync import PlayoutFrame, QueueClosed

if TYPE_CHECKING:
    from server.avatars import AvatarStore
    from server.config import ServerConfig
    from server.sessions import SessionManager

log = logging.getLogger(__name__)

_CONNECTION_IDS = itertools.count(1)
AUDIO_QUEUE_MESSAGES = 8   # audio messages read ahead of the engine per connection
MAX_OUTBOX_FRAMES = 8      # frames waiting for a slow client before the oldest are dropped
MAX_OUTBOX_EVENTS = 1000   # a client this far behind on events is broken: disconnect it
VIEWER = "viewer"          # server.auth.VIEWER: a connection opened with the viewer token
VIEWER_REQUESTS = ("view", "ping")


class Outbox:
    """Ordered outgoing messages: events (dicts) and frames; frames may be dropped, events may not."""

    def __init__(self, max_frames: int = MAX_OUTBOX_FRAMES):
        self._items: collections.deque[Any] = collections.deque()
        self._frames = 0
        self.max_frames = max_frames
        self.dropped = 0
        self._ready = asyncio.Event()
        self._taken = asyncio.Event()
        self._closed = False
        self.overflow = False

    # the frames-sink interface of server.sync.Subscription
    def put(self, frame: PlayoutFrame) -> None:
        if self._closed:
            return
        if self._frames >= self.max_frames:
            for i, item in enumerate(self._items):
                if isinstance(item, PlayoutFrame):
                    del self._items[i]
                    self._frames -= 1
                    self.dropped += 1
                    break
        self._items.append(frame)
        self._frames += 1
        self._ready.set()

    def put_event(self, event: dict) -> None:
        if self._closed:
            return
        if len(self._items) - self._frames >= MAX_OUTBOX_EVENTS:
            self.overflow = True
        self._items.append(event)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            if self._closed:
                raise QueueClosed()
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, PlayoutFrame):
            self._frames -= 1
        self._taken.set()
        return item

    async def flushed(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the writer has taken everything queued so far."""
        try:
            async with asyncio.timeout(timeout):
                while self._items and not self._closed:
                    self._taken.clear()
                    await self._taken.wait()
        except TimeoutError:
            pass

    def close(self) -> None:
        self._closed = True
        self._ready.set()


class _FramesSink:
    """Feeds a playout subscription's frames into the outbox; closing the subscription leaves the outbox open."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.closed = False

    def put(self, frame: PlayoutFrame) -> None:
        if not self.closed:
            self.outbox.put(frame)

    def close(self) -> None:
        self.closed = True

    @property
    def dropped(self) -> int:
        return self.outbox.dropped


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


async def _answer(coro, request: str):
    """aiortc's errors for an unusable SDP offer become a clear protocol error."""
    try:
        return await coro
    except Exception as exc:  # aiortc raises ValueError, AssertionError, ... on malformed SDP
        raise ProtocolError(f"{request}.webrtc: cannot use this SDP offer ({_sdp_reason(exc)})"[:300],
                            "bad_message", request) from None


def _sdp_reason(exc: Exception) -> str:
    """aiortc's parser asserts without a message (e.g. on an m= line it cannot read): say what that means."""
    if str(exc):
        return f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, (AssertionError, KeyError, IndexError)):
        return "malformed SDP: a line (m=, a=, c=, ...) does not have the form RFC 8866 gives it"
    return exc.__class__.__name__


@dataclass(frozen=True)
class ApiContext:
    """What a connection needs of the server (given to it, not the whole server)."""

    config: "ServerConfig"
    sessions: "SessionManager"
    avatars: "AvatarStore"
    viewer_url: Callable[[str], str]
    role_of: Callable[[Any], str] = lambda ws: "admin"        # server.auth.ADMIN / VIEWER of a connection
    address_of: Callable[[Any], str] = lambda ws: ws.remote_address[0]   # the client's (behind trusted proxies)


class Connection:
    def __init__(self, server: ApiContext, ws: Any):
        self.server = server   # the server's parts this connection uses
        self.ws = ws
        self.cfg = server.config
        self.owner = f"ws-{next(_CONNECTION_IDS)}"   # holds the avatars this connection uploads
        self.role = server.role_of(ws)   # "viewer": the viewer token - view and ping only
        self.outbox = Outbox()
        self.session: ServerSession | None = None
        self.start_msg: Start | None = None
        self.pending_avatar: AvatarUpload | None = None
        self.audio_q: asyncio.Queue[bytes] = asyncio.Queue(AUDIO_QUEUE_MESSAGES)
        self.viewing: list[tuple[ServerSession, Any]] = []
        self._request: str | None = None
        self._session_gone = asyncio.Event()
        self._ended_by_server = False
        self._feeder: asyncio.Task | None = None  # moves queued PCM into the session (audio starts)
        self._last_frame_sent = float("-inf")  # monotonic time the writer last sent a JPEG frame
        self._tasks: set[asyncio.Task] = set()     # background work kept referenced until done

    # -- main loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self._writer(), name="ws-writer")
        keepalive = asyncio.create_task(self._keepalive(), name="ws-keepalive")
        try:
            async for message in self.ws:
                self._request = None  # the request an error reply refers to
                try:
                    if isinstance(message, bytes):
                        await self._binary(message)
                    else:
                        await self._text(message)
                except ProtocolError as exc:
                    self.send(protocol.error(exc.code, str(exc), exc.request or self._request))
                except ServerBusyError as exc:
                    self.send(protocol.error("busy", str(exc), "start"))
                except (PortraitPoolBusy, AvatarCacheFullError) as exc:  # uploads: try again later
                    self.send(protocol.error("busy", str(exc), self._request))
                except UploadRateError as exc:
                    self.send(protocol.error("rate_limited", str(exc), self._request))
                except ImageInputError as exc:  # unreadable image, no face: the user's input, not our crash
                    self.send(protocol.error("bad_image", str(exc), self._request))
                except EngineUnhealthyError as exc:   # a failed or hung device: this server takes no sessions
                    self.send(protocol.error("unavailable", str(exc), self._request))
                except EmoStreamError as exc:
                    self.send(protocol.error("bad_input", str(exc), self._request))
                except ConnectionClosed:
                    raise
                except Exception:  # a bug handling one message: report it, keep the connection and session
                    log.exception("handling a %s message failed", self._request or "binary")
                    self.send(protocol.error("internal", "the server failed to handle this message", self._request))
                if self.outbox.overflow:
                    await self.ws.close(1008, "client is not reading its messages")
                    break
        except ConnectionClosed:
            pass
        finally:
            await self.cleanup()
            writer.cancel()
            keepalive.cancel()
            await asyncio.gather(writer, keepalive, return_exceptions=True)

    def send(self, event: dict) -> None:
        self.outbox.put_event(event)

    async def _writer(self) -> None:
        quality = 80
        try:
            while True:
                item = await self.outbox.get()
                if isinstance(item, PlayoutFrame):
                    if self.start_msg is not None:
                        quality = self.start_msg.jpeg_quality
                    jpeg = await asyncio.to_thread(_jpeg, item.image, quality)
                    pcm = float_to_pcm16(item.audio).tobytes()
                    header = protocol.frame_header(item.seq, item.pts, item.speech, item.segment_end)
                    await self.ws.send(protocol.encode_frame(header, jpeg, pcm))
                    self._last_frame_sent = time.monotonic()
                else:
                    await self.ws.send(json.dumps(item, separators=(",", ":")))
        except (QueueClosed, ConnectionClosed):
            pass

    async def _keepalive(self) -> None:
        """Ping every ping_interval_s and expect the pong within ping_timeout_s - or within reader_timeout_s
        while JPEG frames flow: then the ping waits behind frames a slow client has not read yet, and such
        a client only loses its oldest frames (Outbox). No pong for that long: gone or stopped reading."""
        ka = self.cfg.keepalive
        try:
            while True:
                await asyncio.sleep(ka.ping_interval_s)
                frames_flowing = time.monotonic() - self._last_frame_sent < ka.reader_timeout_s
                limit = max(ka.ping_timeout_s, ka.reader_timeout_s) if frames_flowing else ka.ping_timeout_s
                try:
                    async with asyncio.timeout(limit):
                        await (await self.ws.ping())
                except TimeoutError:
                    log.info("connection %s: no keepalive pong for %.1f s: closing it",
                             self.ws.remote_address, limit)
                    try:
                        async with asyncio.timeout(ka.close_timeout_s + 1.0):
                            await self.ws.close(1011, "keepalive ping timeout")
                    except TimeoutError:
                        self.ws.transport.abort()
                    return
        except ConnectionClosed:
            pass

    def _viewer_url(self, session_id: str) -> str:
        """Bound to every interface, the host this client reached us by is one it can open the viewer at."""
        url = self.server.viewer_url(session_id)
        request = getattr(self.ws, "request", None)
        host = request.headers.get("Host") if request is not None else None
        if host and not self.cfg.public_url and self.cfg.host in ("0.0.0.0", "::", ""):
            url = urlsplit(url)._replace(netloc=host).geturl()
        return url

    def _ice(self) -> dict:
        """The client's address (forwarded, behind a trusted proxy) and the server address it reached:
        what the ICE candidate policy (server.ice_policy) judges offers and answers by."""
        local = getattr(self.ws, "local_address", None)
        return {"peer": self.server.address_of(self.ws), "local": str(local[0]) if local else None}

    def _stats(self, session: ServerSession) -> dict:
        # frames_dropped: JPEG frames this connection's client read too slowly to get (oldest first)
        return protocol.stats({**session.stats(), "frames_dropped": self.outbox.dropped})

    def _bound_send_buffer(self) -> None:
        """A small kernel send buffer keeps a slow reader's backlog in the Outbox, where frames are dropped."""
        sock = self.ws.transport.get_extra_info("socket") if self.ws.transport is not None else None
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.cfg.limits.frames_send_buffer_bytes)
        except OSError:
            log.debug("cannot set SO_SNDBUF", exc_info=True)

    # -- text messages ---------------------------------------------------------------------------
    async def _text(self, text: str) -> None:
        limits = self.cfg.limits
        msg = protocol.parse_message(text, limits.max_text_bytes, limits.max_upload_bytes)
        self._request = getattr(msg, "type", None) or {Start: "start", View: "view", AvatarUpload: "avatar"}[type(msg)]
        if self.role == VIEWER and self._request not in VIEWER_REQUESTS:
            raise ProtocolError(f"{self._request}: the viewer token allows only view and ping", "forbidden",
                                self._request)
        if not isinstance(msg, AvatarUpload):
            self.pending_avatar = None  # an announced upload must be followed by its bytes at once
        if isinstance(msg, Start):
            await self._start(msg)
        elif isinstance(msg, View):
            await self._view(msg)
        elif isinstance(msg, AvatarUpload):
            self.pending_avatar = msg
        else:
            await self._simple(msg)

    async def _start(self, msg: Start) -> None:
        if self.session is not None:
            raise ProtocolError("a session is already running on this connection (send stop first)",
                                "bad_state", "start")
        avatar = self.server.avatars.get(msg.avatar)
        session = await self.server.sessions.open(avatar, seed=msg.seed, kind="webrtc" if msg.webrtc else "ws")
        self._session_gone = asyncio.Event()
        self._ended_by_server = False
        self.session = session
        self.start_msg = msg
        session.add_listener(self._on_session_event)
        reply: dict[str, Any] = protocol.session_started(session.id, self._viewer_url(session.id), self.cfg.fps,
                                                         self.cfg.size)
        try:
            if msg.webrtc is not None:
                from server.rtc import answer_offer, pump_mic

                sub = session.playout.subscribe("talk-page", frames=self.cfg.playout.webrtc_video_frames(),
                                                audio=self.cfg.playout.audio_queue_chunks)
                backlog = self.cfg.sessions.mic_max_backlog_s
                pc, answer = await _answer(answer_offer(
                    msg.webrtc.sdp, sub,
                    on_mic=lambda track: session.spawn(pump_mic(track, session, backlog), "mic"),
                    on_closed=lambda: self._peer_gone(session),
                    mic_jitter_packets=self.cfg.sessions.mic_jitter_packets,
                    video_delay_s=self.cfg.playout.webrtc_video_delay_ms / 1000,
                    video_hold_s=self.cfg.playout.webrtc_video_hold_ms / 1000, **self._ice()), "start")
                session.add_peer(pc)
                reply["answer"] = {"type": answer.type, "sdp": answer.sdp}
            else:
                self._feeder = session.spawn(self._feed_audio(session, msg.audio), "feed")
            if msg.frames == "jpeg":
                self._bound_send_buffer()
                session.playout.subscribe("ws-frames", frames=None, audio=None, frames_sink=_FramesSink(self.outbox))
            if msg.stats_interval:
                session.spawn(self._push_stats(session, msg.stats_interval), "stats")
        except Exception:
            # the client never heard session_started: it gets the error alone, no session_ended
            session.remove_listener(self._on_session_event)
            await self._end_session("setup failed")
            raise
        self.send(reply)

    async def _peer_gone(self, session: ServerSession) -> None:
        if self.session is session:
            await self._end_session("peer connection closed")
            await self.outbox.flushed(timeout=1.0)  # session_ended goes out before the close
            await self.ws.close(1000, "peer connection closed")

    async def _view(self, msg: View) -> None:
        session = self.server.sessions.get(msg.session)
        if session is None:
            raise ProtocolError(f"no such session {msg.session!r}", "not_found", "view")
        if len(self.viewing) >= 4:
            raise ProtocolError("at most 4 views per connection", "bad_state", "view")
        if session.viewers >= self.cfg.sessions.max_viewers:
            raise ProtocolError(f"session {session.id} already has {session.viewers} viewers (the limit); "
                                "try again later", "busy", "view")
        from server.rtc import answer_offer

        # the slot is taken before the first await: views arriving together on other connections all
        # see it, so no more than max_viewers ever pass the check (it is given back if the answer fails)
        session.viewers += 1
        try:
            sub = session.playout.subscribe("viewer", frames=self.cfg.playout.webrtc_video_frames(),
                                            audio=self.cfg.playout.audio_queue_chunks)
            pc, answer = await _answer(answer_offer(msg.webrtc.sdp, sub,
                                                    on_closed=lambda: self._viewer_gone(session, pc),
                                                    video_delay_s=self.cfg.playout.webrtc_video_delay_ms / 1000,
                                                    video_hold_s=self.cfg.playout.webrtc_video_hold_ms / 1000,
                                                    **self._ice()),
                                       "view")
        except BaseException:
            session.viewers -= 1
            raise
        session.add_peer(pc)
        self.viewing.append((session, pc))
        session.add_listener(self._on_view_event)
        self.send(protocol.view_started(session.id, answer.type, answer.sdp, self.cfg.fps, self.cfg.size))

    async def _viewer_gone(self, session: ServerSession, pc: Any) -> None:
        if (session, pc) in self.viewing:
            self.viewing.remove((session, pc))
            session.viewers -= 1
            await session.remove_peer(pc)

    def _on_view_event(self, event: dict) -> None:
        if event["type"] == protocol.SESSION_ENDED:
            self.send(event)

    async def _simple(self, msg: Simple) -> None:
        kind = msg.type
        if kind == "ping":
            self.send(protocol.pong())
            return
        if kind == "stats":
            if self.session is None:
                raise ProtocolError("no session: send start first", "bad_state", kind)
            self.send(self._stats(self.session))
            return
        if self.session is None:
            raise ProtocolError(f"{kind}: no session on this connection (send start first)", "bad_state", kind)
        if kind == "end_of_segment":
            if self.start_msg is not None and self.start_msg.audio is not None:
                await self._enqueue(b"")  # in order after the audio already read
            else:
                self.session.end_of_speech()
        elif kind == "clear":
            session = self.session
            if self._feeder is not None and not self._feeder.done():
                # the feeder may be part-way through a message, waiting for room in the engine: the
                # rest of it must not play after the clear, so drop it with the feeder and start afresh
                self._feeder.cancel()
                await asyncio.gather(self._feeder, return_exceptions=True)
                if self.session is not session or self.start_msg is None or self.start_msg.audio is None:
                    return  # the session ended meanwhile
                self._feeder = session.spawn(self._feed_audio(session, self.start_msg.audio), "feed")
            self._drain_audio()
            session.clear()
            self.send(protocol.cleared(session.id))
        elif kind == "stop":
            await self._end_session("stopped")

    # -- binary messages -------------------------------------------------------------------------
    async def _binary(self, data: bytes) -> None:
        if self.role == VIEWER:
            raise ProtocolError("the viewer token allows only view and ping", "forbidden")
        if self.pending_avatar is not None:
            self._request = "avatar"
            upload, self.pending_avatar = self.pending_avatar, None
            protocol.check_image_bytes(data, upload)
            avatar_id = await self.server.avatars.add(data, owner=self.owner, address=self.server.address_of(self.ws))
            self.send(protocol.avatar_ready(avatar_id))
            return
        if self.session is None or self.start_msg is None or self.start_msg.audio is None:
            if self._ended_by_server:
                return  # audio already in flight when the server ended the session (session_ended says why)
            raise ProtocolError("binary messages are audio: send start with an audio format first "
                                "(or an avatar message before image bytes)", "bad_state")
        fmt = self.start_msg.audio
        protocol.check_audio_chunk(data, fmt, self.cfg.limits.max_audio_chunk_bytes)
        self.session.received(len(data) / fmt.bytes_per_sample_frame / fmt.sample_rate)
        await self._enqueue(data)

    async def _enqueue(self, data: bytes) -> None:
        """Queue audio for the feeder. When the engine is behind this waits, so the connection stops
        reading and TCP pushes back on the bot; the wait ends early if the peer goes away (keepalive
        notices within ~2 s even though nothing is read) or the session ends."""
        if not self.audio_q.full():
            self.audio_q.put_nowait(data)
            return
        waits = [asyncio.ensure_future(self.audio_q.put(data)), asyncio.ensure_future(self.ws.wait_closed()),
                 asyncio.ensure_future(self._session_gone.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _feed_audio(self, session: ServerSession, fmt: protocol.AudioFormat) -> None:
        while True:
            data = await self.audio_q.get()
            if not data:
                session.end_of_speech()
                continue
            pcm = np.frombuffer(data, dtype="<i2")
            if session.closed:
                return
            try:
                await session.push_audio(pcm, sample_rate=fmt.sample_rate, channels=fmt.channels)
            except EmoStreamError:
                if session.closed or session.engine_session.closed:
                    return  # closed while waiting for room: nothing to feed any more
                raise

    async def _push_stats(self, session: ServerSession, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.send(self._stats(session))

    # -- session events --------------------------------------------------------------------------
    def _on_session_event(self, event: dict) -> None:
        self.send(event)
        if event.get("type") == protocol.SESSION_ENDED and self.session is not None and event.get("session") == self.session.id:
            # ended by the server (idle timeout, shutdown, failure): forget it and release a blocked reader
            self.session, self.start_msg = None, None
            self._ended_by_server = True
            self._session_gone.set()
            self._drain_audio()
        if event.get("type") == protocol.ERROR and event.get("fatal") and self.session is not None:
            # the engine or playout failed for this session only: free its slot, keep the connection
            reason = event.get("message") if event.get("code") == "generation_failed" else "failed"
            task = asyncio.get_running_loop().create_task(self._end_session(reason), name="ws-end-session")
            self._tasks.add(task)   # the loop keeps only a weak reference to a task
            task.add_done_callback(self._tasks.discard)

    def _drain_audio(self) -> None:
        while not self.audio_q.empty():
            self.audio_q.get_nowait()

    async def _end_session(self, reason: str) -> None:
        session, self.session = self.session, None
        self.start_msg, self._feeder = None, None
        self._session_gone.set()
        self._drain_audio()
        if session is not None:
            await self.server.sessions.close(session, reason)

    async def cleanup(self) -> None:
        self.outbox.close()
        self.server.avatars.release(self.owner)   # its uploads may be dropped again (a session keeps its own)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._end_session("connection closed")
        for session, pc in list(self.viewing):
            await self._viewer_gone(session, pc)
            session.remove_listener(self._on_view_event)
