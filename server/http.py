"""Plain HTTP on the WebSocket port (websockets' process_request hook): pages, static files, health and stats.

websockets only parses GET requests, which is all the server needs: signalling and uploads travel
over the WebSocket (/api/ws). Auth: when a token is configured (always when bound beyond
loopback) every route except /healthz needs ?token=... or "Authorization: Bearer ...".
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import mimetypes
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from emo_stream.resources import resource_dir

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.sessions import SessionManager

log = logging.getLogger(__name__)

CLIENT_DIR = resource_dir("client_web")
WS_PATH = "/api/ws"
PAGES = {"/": "index.html", "/index.html": "index.html", "/viewer": "viewer.html", "/viewer.html": "viewer.html"}
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


class WrongTokenLimiter:
    """Wrong tokens from one address: after `attempts` within `window_s` it is refused (429) until the
    oldest falls out of the window, so guessing a token online is hopeless. Bounded memory."""

    MAX_ADDRESSES = 4096

    def __init__(self, attempts: int = 10, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.attempts = attempts
        self.window_s = window_s
        self.clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _recent(self, address: str) -> collections.deque[float]:
        now = self.clock()
        times = self._failures.get(address, collections.deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def retry_after(self, address: str) -> float:
        """Seconds this address must wait before its next attempt counts (0: it may try now)."""
        times = self._recent(address)
        if len(times) < self.attempts:
            return 0.0
        return max(1.0, self.window_s - (self.clock() - times[0]))

    def failed(self, address: str) -> None:
        times = self._recent(address)
        times.append(self.clock())
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.MAX_ADDRESSES:
            self._failures.popitem(last=False)


def _token_given(request: Request) -> bool:
    return "token=" in urlsplit(request.path).query or "Authorization" in request.headers


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

    def token_ok(self, request: Request, query: dict[str, list[str]]) -> bool:
        token = self.config.token
        if not self.config.auth_required or not token:
            return True
        given = (query.get("token") or [""])[0]
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":  # the scheme is case-insensitive (RFC 9110)
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), token.encode())

    def origin_ok(self, request: Request) -> bool:
        """Refuse WebSocket connections that a page from another site opened in the user's browser."""
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser (bots)
            return True
        host = request.headers.get("Host", "")
        return urlsplit(origin).netloc == host

    async def __call__(self, connection: Any, request: Request) -> Response | None:
        try:
            if self.config.auth_required and self.config.token:
                return self._route_limited(connection, request)
            return self.route(request)   # no token to guess: nothing to limit
        except MultipleValuesError as exc:  # e.g. two Authorization or Origin headers: ambiguous, refuse
            return response(400, f"header {exc} given more than once\n")
        except Exception:
            log.exception("HTTP %s failed", request.path)
            return response(500, "internal error\n")

    def _route_limited(self, connection: Any, request: Request) -> Response | None:
        """route(), refusing addresses that sent too many wrong tokens (WrongTokenLimiter)."""
        address = connection.remote_address[0] if getattr(connection, "remote_address", None) else "?"
        wait = self.limiter.retry_after(address)
        if wait and request.path.split("?")[0] != "/healthz":
            return response(429, f"too many wrong tokens from {address}: try again in {wait:.0f} s\n",
                            extra={"Retry-After": str(int(wait + 0.999))})
        reply = self.route(request)
        if reply is not None and reply.status_code == 401 and _token_given(request):
            self.limiter.failed(address)  # a guess; a link opened without its token is no attack
        return reply

    def route(self, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":   # 503 unless serving normally: a load balancer / orchestrator takes it out
            health = self.health()
            return json_response(200 if health.get("status") == "ok" else 503, health)
        if path == WS_PATH:
            if not self.token_ok(request, query):
                return response(401, "missing or wrong token\n")
            if not self.origin_ok(request):
                return response(403, "cross-origin WebSocket refused\n")
            return None  # go on with the WebSocket handshake
        if path == "/favicon.ico":
            return response(204, b"")
        if path.startswith("/static/") and not path.lower().endswith(".html"):  # scripts, styles: public
            return self.static(path[len("/static/"):])
        if not self.token_ok(request, query):
            return response(401, "missing or wrong token: open the URL the server printed (it ends in ?token=...)\n")
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
        if "/" in name or "\\" in name or name.startswith(".") or not name:
            return response(404, "not found\n")
        path = CLIENT_DIR / name
        if not path.is_file():
            return response(404, "not found\n")
        content_type = STATIC_TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        extra = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"} if csp else None
        return response(200, path.read_bytes(), content_type, extra)
