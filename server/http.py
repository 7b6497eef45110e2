"""Plain HTTP on the WebSocket port (websockets' process_request hook): pages, static files, health and stats.

websockets only parses GET requests, which is all the server needs: signalling and uploads travel
over the WebSocket (/api/ws). Auth: when a token is configured (always when bound beyond
loopback) every route except /healthz needs ?token=... or "Authorization: Bearer ...".
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
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


def json_response(status: int, data: Any) -> Response:
    return response(status, json.dumps(data, indent=1), "application/json")


class HttpRoutes:
    """websockets' process_request hook: pages, static files, health and session stats."""

    def __init__(self, config: "ServerConfig", sessions: "SessionManager", health: Callable[[], dict]):
        self.config = config
        self.sessions = sessions
        self.health = health

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
            return self.route(request)
        except MultipleValuesError as exc:  # e.g. two Authorization or Origin headers: ambiguous, refuse
            return response(400, f"header {exc} given more than once\n")
        except Exception:
            log.exception("HTTP %s failed", request.path)
            return response(500, "internal error\n")

    def route(self, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/healthz":
            return json_response(200, self.health())
        if path == WS_PATH:
            if not self.token_ok(request, query):
                return response(401, "missing or wrong token\n")
            if not self.origin_ok(request):
                return response(403, "cross-origin WebSocket refused\n")
            return None  # go on with the WebSocket handshake
        if path == "/favicon.ico":
            return response(204, b"")
        if path.startswith("/static/"):  # scripts and styles are public; pages and data need the token
            return self.static(path[len("/static/"):])
        if not self.token_ok(request, query):
            return response(401, "missing or wrong token: open the URL the server printed (it ends in ?token=...)\n")
        if path in PAGES:
            return self.static(PAGES[path], csp=True)
        if path == "/api/sessions":
            return json_response(200, {"sessions": [s.stats() for s in self.sessions.all()]})
        if path.startswith("/api/sessions/"):
            session = self.sessions.get(path.rsplit("/", 1)[-1])
            if session is None:
                return json_response(404, {"error": "no such session"})
            return json_response(200, session.stats())
        if path == "/api/capacity":  # lets a page learn "busy" before asking for the mic
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
