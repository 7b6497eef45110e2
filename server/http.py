"""Plain HTTP on the WebSocket port (websockets' process_request hook): pages, static files, health and stats.

websockets only parses GET requests: signalling and uploads travel over the WebSocket (/api/ws),
and the other methods WHIP and WHEP need are read by server.http_requests before websockets sees
them. Auth (server.auth, docs/security.md): when a token is configured (always
when bound beyond loopback) every route needs ?token=... or "Authorization: Bearer ..." except /healthz's
status and the public scripts; the viewer token opens the viewer page and `view` only. In loopback mode
only requests addressed to a loopback name (or a configured one) are answered: DNS rebinding.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from emo_stream.resources import resource_dir
from server.auth import (ADMIN, VIEWER, WrongTokenLimiter, client_address, derive_viewer_token, given_token,
                         host_allowed, parse_networks, query_params, redact, same)

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.sessions import SessionManager

log = logging.getLogger(__name__)

CLIENT_DIR = resource_dir("client_web")
WS_PATH = "/api/ws"
WHIP_PATH, WHEP_PATH = "/whip", "/whep"   # POST endpoints (server.whip); a GET there gets 405
ENDPOINT_METHODS = "POST, OPTIONS"
RESOURCE_METHODS = "DELETE, OPTIONS"
PAGES = {"/": "index.html", "/index.html": "index.html", "/viewer": "viewer.html", "/viewer.html": "viewer.html"}
VIEWER_PAGES = {"/viewer", "/viewer.html", "/static/viewer.html"}   # what the viewer token opens over HTTP
PUBLIC_HEALTH = ("status", "backend")   # /healthz without the master token (when one is needed)
# file names Windows reads as devices or alternate streams, and trailing dots/spaces it drops (so
# "index.html." would open index.html while skipping the .html token check)
_WINDOWS_UNSAFE = re.compile(r"[:<>\"|?*\x00-\x1f]|[. ]$|^(con|prn|aux|nul|com\d|lpt\d)(\.|$)", re.IGNORECASE)
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png",
                ".svg": "image/svg+xml", ".ico": "image/x-icon", ".jpg": "image/jpeg"}
# pages load only our own scripts; media/WebSocket connections to this server
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'")


def response(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
             extra: dict[str, str] | None = None) -> Response:
    if isinstance(body, str):
        body = body.encode()
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Connection"] = "close"
    for k, v in (extra or {}).items():
        headers[k] = v
    return Response(status, HTTPStatus(status).phrase, headers, body)


def is_webrtc_http_path(path: str) -> bool:
    return path in (WHIP_PATH, WHEP_PATH) or path.startswith((WHIP_PATH + "/", WHEP_PATH + "/"))


def method_not_allowed(path: str) -> Response:
    """405 for a method the WHIP/WHEP paths do not take (GET included: they are POST endpoints)."""
    allow = ENDPOINT_METHODS if path in (WHIP_PATH, WHEP_PATH) else RESOURCE_METHODS
    what = "a WHIP endpoint (RFC 9725)" if path.startswith(WHIP_PATH) else "a WHEP endpoint"
    if path not in (WHIP_PATH, WHEP_PATH):
        what += " session: DELETE ends it (no trickle ICE: the answer carries every candidate)"
    return response(405, f"{path} is {what}; allowed: {allow}\n", extra={"Allow": allow})


def misdirected() -> Response:
    return response(421, "this server answers to localhost, 127.0.0.1 and [::1] at its port (add other names to "
                         "allowed_hosts)\n")


def json_response(status: int, data: Any) -> Response:
    return response(status, json.dumps(data, indent=1), "application/json")


class HttpRoutes:
    """websockets' process_request hook: pages, static files, health and session stats."""

    def __init__(self, config: "ServerConfig", sessions: "SessionManager", health: Callable[[], dict],
                 poster: Callable[[], bytes | None] = lambda: None):
        self.config = config
        self.poster = poster  # the default avatar as a JPEG (the talk page shows it before Start)
        self.sessions = sessions
        self.health = health
        self.limiter = WrongTokenLimiter()
        self.trusted_proxies = parse_networks("trusted_proxies", config.trusted_proxies)
        self.local_port = config.port   # the bound port (StreamServer sets it when the port was 0)

    @property
    def viewer_token(self) -> str | None:
        cfg = self.config
        return cfg.viewer_token or (derive_viewer_token(cfg.token) if cfg.token else None)

    def secrets(self) -> tuple[str | None, ...]:
        return self.config.token, self.viewer_token

    def role(self, request: Request, query: dict[str, list[str]] | None = None) -> str | None:
        """ADMIN for the master token (or when no token is needed), VIEWER for the viewer token, else None."""
        if not self.config.auth_required or not self.config.token:
            return ADMIN
        given = given_token(request.headers, query_params(request.path) if query is None else query)
        if same(given, self.config.token):
            return ADMIN
        if same(given, self.viewer_token):
            return VIEWER
        return None

    def client_address(self, connection: Any, request: Request) -> str:
        """The client's address: the TCP peer, or the forwarded one when the peer is a trusted proxy."""
        peer = connection.remote_address[0] if getattr(connection, "remote_address", None) else "?"
        return self.forwarded_address(str(peer), request.headers)

    def forwarded_address(self, peer: str, headers: Any) -> str:
        return client_address(peer, headers.get_all("X-Forwarded-For"), self.trusted_proxies)

    def host_ok(self, request: Any, connection: Any = None) -> bool:
        """Loopback mode: refuse requests addressed to a name that is not ours (DNS rebinding)."""
        if not self.config.loopback:
            return True   # reached over the network: the token guards, whatever name was used
        local = getattr(connection, "local_address", None)
        port = local[1] if local else self.local_port
        names = list(self.config.allowed_hosts)
        if self.config.public_url:
            names.append(urlsplit(self.config.public_url).hostname or "")
        return host_allowed(request.headers.get("Host"), port, self.config.tls, names)

    def origin_ok(self, request: Request) -> bool:
        """Refuse WebSocket connections that a page from another site opened in the user's browser."""
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser (bots)
            return True
        host = request.headers.get("Host", "")
        return urlsplit(origin).netloc == host

    async def __call__(self, connection: Any, request: Request) -> Response | None:
        try:
            if not self.host_ok(request, connection):
                return misdirected()
            if self.config.auth_required and self.config.token:
                return await self._route_limited(connection, request)
            return self.route(request, ADMIN)   # no token to guess: nothing to limit
        except MultipleValuesError as exc:  # e.g. two Authorization or Origin headers: ambiguous, refuse
            return response(400, f"header {exc} given more than once\n")
        except Exception:
            log.exception("HTTP %s failed", redact(request.path, self.secrets()))
            return response(500, "internal error\n")

    async def check_token(self, address: str, request: Any) -> tuple[str | None, Response | None]:
        """The request's role (ADMIN, VIEWER or None), its token - however the parameter's name is
        spelled - checked at the pace the wrong-token limiter allows `address`; or a 429 to send."""
        query = query_params(request.path)
        carries_token = given_token(request.headers, query) is not None
        if carries_token:
            wait = await self.limiter.admit(address)
            if wait:
                return None, response(429, f"too many wrong tokens from {address}: try again in {wait:.0f} s\n",
                                      extra={"Retry-After": str(int(wait + 0.999))})
        role = self.role(request, query)
        if carries_token:
            if role is None:
                self.limiter.failed(address)   # a guess; a link opened without its token is no attack
            else:
                self.limiter.succeeded(address)
        return role, None

    async def _route_limited(self, connection: Any, request: Request) -> Response | None:
        role, refusal = await self.check_token(self.client_address(connection, request), request)
        return refusal or self.route(request, role)

    def route(self, request: Request, role: str | None = ADMIN) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            health = self.health()
            # 503 unless serving normally: a load balancer / orchestrator takes the server out
            code = 200 if health.get("status") == "ok" else 503
            if role != ADMIN:   # sessions, viewers and uptime tell when the user is live: the token's
                health = {k: health[k] for k in PUBLIC_HEALTH if k in health}
            return json_response(code, health)
        if path == WS_PATH:
            if role is None:
                return response(401, "missing or wrong token\n")
            if not self.origin_ok(request):
                return response(403, "cross-origin WebSocket refused\n")
            return None  # go on with the WebSocket handshake
        if is_webrtc_http_path(path):
            return method_not_allowed(path)   # WHIP/WHEP take POST and DELETE (server.whip)
        if path == "/favicon.ico":
            return response(204, b"")
        if path.startswith("/static/") and not path.lower().endswith(".html"):  # scripts, styles: public
            return self.static(path[len("/static/"):])
        if role is None:
            return response(401, "missing or wrong token: open the URL the server printed (it ends in ?token=...)\n")
        if role == VIEWER and path not in VIEWER_PAGES:
            return response(403, "the viewer token opens the viewer page only\n")
        if path in PAGES:
            return self.static(PAGES[path], csp=True)
        if path.startswith("/static/"):  # a page by its file name: the token was checked above
            return self.static(path[len("/static/"):], csp=True)
        if path == "/api/sessions":
            return json_response(200, {"sessions": [s.stats() for s in self.sessions.all()]})
        if path.startswith("/api/sessions/"):
            session = self.sessions.get(path.rsplit("/", 1)[-1])
            if session is None:
                return json_response(404, {"error": "no such session"})
            return json_response(200, session.stats())
        if path == "/api/avatar.jpg":
            poster = self.poster()
            return response(200, poster, "image/jpeg") if poster else response(404, "no default avatar\n")
        if path == "/api/capacity":  # lets a page learn "busy" before asking for the mic
            health = self.health()
            if health.get("status") not in ("ok", "starting"):
                return json_response(503, {"error": "unavailable", "message": f"the avatar engine is unavailable "
                                           f"({health['status']}: {health.get('reason')})"})
            if len(self.sessions) >= self.config.sessions.max_sessions:
                return json_response(503, {"error": "busy", "message": "all session slots are in use"})
            return json_response(200, {"ok": True})
        return response(404, "not found\n")

    def static(self, name: str, csp: bool = False) -> Response:
        # only plain file names inside client_web/: no traversal, no hidden files
        if "/" in name or "\\" in name or name.startswith(".") or not name or _WINDOWS_UNSAFE.search(name):
            return response(404, "not found\n")
        path = CLIENT_DIR / name
        if not path.is_file():
            return response(404, "not found\n")
        content_type = STATIC_TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        extra = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"} if csp else None
        return response(200, path.read_bytes(), content_type, extra)
