"""WHIP ingest (RFC 9725) and WHEP egress: standard WebRTC clients send speech in and play the avatar out.

    POST /whip            Content-Type: application/sdp, the offer  -> 201, the answer, Location: /whip/ID
    DELETE /whip/ID       ends that session                         -> 200
    POST /whep?session=S  (S a session id or "latest")              -> 201, the answer, Location: /whep/ID
    DELETE /whep/ID       stops that player                         -> 200

A WHIP session is a live session like the talk page's: the client's audio drives the avatar; the
avatar's video and audio go back on the same peer connection for the media sections the offer
receives on (recvonly/sendrecv); a send-only publisher (OBS) is watched through WHEP or /viewer.
WHEP plays one session to any number of players (up to sessions.max_viewers).

Errors use the statuses RFC 9725 names: 400 (unusable SDP, missing parameter), 401 (missing or wrong
token: `WWW-Authenticate: Bearer`), 403 (a viewer token may play, not publish), 404 (unknown session
or resource, DELETE twice), 405 (with Allow; PATCH too: no trickle ICE or ICE restarts, the answer
carries all candidates), 415 (not application/sdp), 429 (too many wrong tokens), 503 (server or session
full, with Retry-After). The token is the server's (`Authorization: Bearer TOKEN` or ?token=).

Browsers: CORS is granted to any origin when the server requires a token (a page must know it);
without one (loopback only) only same-origin pages may call these endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.http11 import Response

from emo_stream.errors import EmoStreamError
from emo_stream.streaming import EngineUnhealthyError, UnknownAvatarError

from server.auth import ADMIN, VIEWER
from server.http import (ENDPOINT_METHODS, RESOURCE_METHODS, WHEP_PATH, WHIP_PATH, is_webrtc_http_path,
                         method_not_allowed, misdirected, response)
from server import protocol
from server.http_requests import HttpRequest
from server.sessions import ServerBusyError, ServerSession

if TYPE_CHECKING:
    from server.avatars import AvatarStore
    from server.config import ServerConfig
    from server.http import HttpRoutes
    from server.sessions import SessionManager

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
EXPOSED = "Location, Link, ETag, Accept-Patch, Emo-Session"
MAX_RESOURCES_PER_SESSION = 64   # WHIP + WHEP resources bound to one session (viewers are capped lower)


@dataclass
class Resource:
    """One WHIP or WHEP session URL: the peer connection it created, on a server session."""

    id: str
    kind: str                 # "whip" | "whep"
    session: ServerSession
    pc: Any
    role: str                 # the token role that created it: "full" | "viewer"
    gone: bool = False

    @property
    def path(self) -> str:
        return f"/{self.kind}/{self.id}"


class WebRtcHttp:
    """The router for POST/DELETE/PATCH/OPTIONS (server.http_requests.HttpConnection calls it)."""

    def __init__(self, config: "ServerConfig", sessions: "SessionManager", avatars: "AvatarStore",
                 routes: "HttpRoutes"):
        self.config = config
        self.sessions = sessions
        self.avatars = avatars
        self.routes = routes        # token check and the wrong-token limiter shared with GET routes
        self.resources: dict[str, Resource] = {}

    # -- entry -------------------------------------------------------------------------------------
    async def __call__(self, request: HttpRequest) -> Response:
        path = request.route
        if not self.routes.host_ok(request):   # loopback mode: no other site's name (DNS rebinding)
            return misdirected()
        if not is_webrtc_http_path(path):
            return response(405, f"{request.method} is not used on {path}: this server's pages and APIs take GET "
                                 "(and WebSocket on /api/ws); WHIP and WHEP take POST on /whip and /whep\n",
                            extra={"Allow": "GET"})
        if request.method == "OPTIONS":
            allow = ENDPOINT_METHODS if path in (WHIP_PATH, WHEP_PATH) else RESOURCE_METHODS
            reply = response(204, b"", extra={"Allow": allow})
            return self._cors(request, reply, allow)
        reply = await self._limited(request)
        return self._cors(request, reply)

    async def _limited(self, request: HttpRequest) -> Response:
        """route(), its token checked at the pace the wrong-token limiter allows the client (server.http)."""
        if self.config.auth_required and self.config.token:
            address = self.routes.forwarded_address(request.remote, request.headers)
            _, refusal = await self.routes.check_token(address, request)
            if refusal is not None:
                return refusal
        return await self.route(request)

    async def route(self, request: HttpRequest) -> Response:
        path, method = request.route, request.method
        if path in (WHIP_PATH, WHEP_PATH):
            if method != "POST":
                return method_not_allowed(path)
            role = self._role(request)
            if role is None:
                return _unauthorized()
            if path == WHIP_PATH:
                if role != "full":
                    return response(403, "this token may watch sessions (WHEP, viewer), not publish: WHIP needs the "
                                         "server's token\n")
                return await self._whip(request)
            return await self._whep(request, role)
        kind, _, rid = path[1:].partition("/")
        resource = self.resources.get(rid) if "/" not in rid else None
        if resource is not None and resource.kind != kind:
            resource = None
        if method not in ("DELETE", "PATCH"):
            return method_not_allowed(path)
        role = self._role(request)
        if role is None:
            return _unauthorized()
        if resource is None or resource.gone:
            return response(404, f"no {kind.upper()} session {rid!r} (ended, deleted already, or never created)\n")
        if role != "full" and resource.role == "full":
            return response(403, "this token may not end a session it did not create\n")
        if method == "PATCH":
            return method_not_allowed(path)   # RFC 9725 4.3.1: no trickle ICE / ICE restarts -> 405
        await self._delete(resource, "ended by its WHIP client (DELETE)" if kind == "whip" else "")
        return response(200, b"")

    # -- auth --------------------------------------------------------------------------------------
    def _role(self, request: HttpRequest) -> str | None:
        """'full' for the server's token (or no token needed), 'viewer' for the read-only viewer token,
        None otherwise."""
        return {ADMIN: "full", VIEWER: "viewer"}.get(self.routes.role(request))

    def _ice(self, request: HttpRequest) -> dict:
        """The client's and our address, for the ICE candidate policy (server.ice_policy)."""
        return {"peer": self.routes.forwarded_address(request.remote, request.headers), "local": request.local}

    def _cors(self, request: HttpRequest, reply: Response, allow: str | None = None) -> Response:
        origin = request.headers.get("Origin")
        if origin is None:
            return reply
        host = request.headers.get("Host", "")
        same_site = origin.split("://", 1)[-1] == host
        if not (same_site or self.config.auth_required):
            return reply   # loopback without a token: a page from another site may not start sessions here
        reply.headers["Access-Control-Allow-Origin"] = origin if same_site else "*"
        reply.headers["Access-Control-Expose-Headers"] = EXPOSED
        if allow is not None:   # a preflight
            reply.headers["Access-Control-Allow-Methods"] = allow
            reply.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, If-Match"
            reply.headers["Access-Control-Max-Age"] = "600"
        return reply

    # -- WHIP --------------------------------------------------------------------------------------
    async def _whip(self, request: HttpRequest) -> Response:
        sdp, error = _offer(request)
        if error is not None:
            return error
        avatar_id = (request.query.get("avatar") or [None])[0]
        try:
            avatar = self.avatars.get(avatar_id)
        except UnknownAvatarError:
            return response(404, f"no avatar {avatar_id!r}: upload one first (WebSocket API) or leave avatar out\n")
        try:
            session = await self.sessions.open(avatar, kind="whip")
        except ServerBusyError as exc:
            return response(503, f"{exc}\n", extra={"Retry-After": "10"})
        except EngineUnhealthyError as exc:   # a failed or hung GPU: /healthz says 503 too
            return response(503, f"{exc}\n")
        rid = secrets.token_urlsafe(16)
        cfg = self.config
        try:
            from server.rtc import answer_media_offer, pump_mic

            backlog = cfg.sessions.mic_max_backlog_s
            pc, answer = await answer_media_offer(
                sdp, lambda video, audio: session.playout.subscribe(
                    "whip", frames=cfg.playout.webrtc_video_frames() if video else None,
                    audio=cfg.playout.audio_queue_chunks if audio else None),
                need_audio_in=True,
                on_mic=lambda track: session.spawn(pump_mic(track, session, backlog), "whip-mic"),
                on_closed=lambda: self._peer_gone(rid),
                mic_jitter_packets=cfg.sessions.mic_jitter_packets,
                video_delay_s=cfg.playout.webrtc_video_delay_ms / 1000,
                video_hold_s=cfg.playout.webrtc_video_hold_ms / 1000, **self._ice(request))
        except Exception as exc:
            await self.sessions.close(session, "WHIP offer refused")
            return _bad_offer(exc)
        session.add_peer(pc)
        session.add_listener(self._on_session_event)
        self.resources[rid] = Resource(rid, "whip", session, pc, "full")
        log.info("WHIP session %s (resource %s) from %s", session.id, rid, request.remote)
        return self._created(request, rid, "whip", session, answer.sdp)

    # -- WHEP --------------------------------------------------------------------------------------
    async def _whep(self, request: HttpRequest, role: str) -> Response:
        sdp, error = _offer(request)
        if error is not None:
            return error
        wanted = (request.query.get("session") or [""])[0]
        if not wanted:
            return response(400, "say which session to play: POST /whep?session=ID (or ?session=latest)\n")
        session = self.sessions.get(wanted)
        if session is None or session.closed:
            return response(404, f"no session {wanted!r} (the ids are listed by GET /api/sessions)\n")
        if session.viewers >= self.config.sessions.max_viewers or \
                sum(r.session is session for r in self.resources.values()) >= MAX_RESOURCES_PER_SESSION:
            return response(503, f"session {session.id} already has {session.viewers} viewers (the limit); "
                                 "try again later\n", extra={"Retry-After": "10"})
        rid = secrets.token_urlsafe(16)
        cfg = self.config
        try:
            from server.rtc import answer_media_offer

            pc, answer = await answer_media_offer(
                sdp, lambda video, audio: session.playout.subscribe(
                    "whep", frames=cfg.playout.webrtc_video_frames() if video else None,
                    audio=cfg.playout.audio_queue_chunks if audio else None),
                need_audio_in=False, on_closed=lambda: self._peer_gone(rid),
                video_delay_s=cfg.playout.webrtc_video_delay_ms / 1000,
                video_hold_s=cfg.playout.webrtc_video_hold_ms / 1000, **self._ice(request))
        except Exception as exc:
            return _bad_offer(exc)
        if session.closed:   # ended while the answer was made
            await pc.close()
            return response(404, f"session {session.id} ended\n")
        session.add_peer(pc)
        session.add_listener(self._on_session_event)
        session.viewers += 1
        self.resources[rid] = Resource(rid, "whep", session, pc, role)
        log.info("WHEP player %s on session %s from %s", rid, session.id, request.remote)
        return self._created(request, rid, "whep", session, answer.sdp)

    # -- resources ---------------------------------------------------------------------------------
    def _created(self, request: HttpRequest, rid: str, kind: str, session: ServerSession, sdp: str) -> Response:
        host = request.headers.get("Host")
        scheme = "https" if self.config.tls else "http"
        location = f"{scheme}://{host}/{kind}/{rid}" if host else f"/{kind}/{rid}"
        return response(201, sdp, SDP_TYPE, extra={"Location": location, "Emo-Session": session.id})

    def _on_session_event(self, event: dict) -> None:
        """A session ended (idle, stopped, its publisher left): its WHIP and WHEP URLs end with it."""
        if event.get("type") != protocol.SESSION_ENDED:
            return
        for resource in [r for r in self.resources.values() if r.session.id == event.get("session")]:
            resource.gone = True
            self.resources.pop(resource.id, None)

    async def _peer_gone(self, rid: str) -> None:
        """The peer connection failed or closed (client gone, session closed): forget the resource."""
        resource = self.resources.get(rid)
        if resource is not None and not resource.gone:
            await self._delete(resource, "WHIP peer connection closed" if resource.kind == "whip" else "")

    async def _delete(self, resource: Resource, reason: str) -> None:
        resource.gone = True
        self.resources.pop(resource.id, None)
        if resource.kind == "whip":
            await self.sessions.close(resource.session, reason)
        else:
            resource.session.viewers = max(0, resource.session.viewers - 1)
            await resource.session.remove_peer(resource.pc)

    async def close_all(self) -> None:
        for resource in list(self.resources.values()):
            resource.gone = True
        self.resources.clear()


def _unauthorized() -> Response:
    return response(401, "missing or wrong token: send Authorization: Bearer TOKEN (the token the server printed)\n",
                    extra={"WWW-Authenticate": 'Bearer realm="emo-stream"'})


def _offer(request: HttpRequest) -> tuple[str, Response | None]:
    """The SDP offer of a POST, or the error response (415 wrong type, 400 no SDP)."""
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != SDP_TYPE:
        return "", response(415, f"Content-Type must be {SDP_TYPE} (the SDP offer as the body): got "
                                 f"{content_type or 'none'!r}\n", extra={"Accept-Post": SDP_TYPE})
    try:
        sdp = request.body.decode("utf-8")
    except UnicodeDecodeError:
        return "", response(400, "the SDP offer is not UTF-8 text\n")
    from server.rtc import offered_media

    try:
        offered_media(sdp)
    except ValueError as exc:
        return "", response(400, f"{exc}\n")
    return sdp, None


def _bad_offer(exc: Exception) -> Response:
    if isinstance(exc, (EmoStreamError, ValueError)) and str(exc):
        reason = str(exc)
    else:
        from server.ws_api import _sdp_reason

        reason = f"cannot use this SDP offer ({_sdp_reason(exc)})"
        log.debug("offer refused", exc_info=exc)
    return response(400, f"{reason[:300]}\n")
