"""HTTP requests other than GET on the one server port: POST, DELETE, PATCH and OPTIONS (WHIP and WHEP).

websockets parses only GET requests (a WebSocket handshake is one); anything else it answers 400
before `process_request` sees it. `HttpConnection` is websockets' own server connection with a look
at the request line first: GET goes on to websockets untouched (pages, /healthz, /api/ws), any other
method is read here (head, then a Content-Length body of bounded size), handed to a router
coroutine, answered and closed. One request per connection (`Connection: close`), as our GET
responses do.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Response

from server.http import response

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024     # request line and headers
MAX_BODY_BYTES = 256 * 1024    # an SDP offer is a few kB; OBS with many codecs and candidates ~20 kB
METHODS = (b"POST", b"DELETE", b"PATCH", b"OPTIONS", b"PUT", b"HEAD")


@dataclass
class HttpRequest:
    """What the router sees: the same `.path` and `.headers` as websockets' Request (so token checks
    work on both), plus the method, the body and the peer's address."""

    method: str
    path: str            # the request target: path and query
    headers: Headers
    body: bytes
    remote: str
    local: str = ""      # the server address the client reached (ICE: the one candidate it needs)

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


Router = Callable[[HttpRequest], Awaitable[Response]]


class HttpConnection(ServerConnection):
    """A websockets ServerConnection that answers non-GET requests itself (through `router`)."""

    def __init__(self, *args: Any, router: Router, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._router = router
        self._mode = "sniff"          # sniff -> ws (websockets takes over) | http (ours)
        self._buf = bytearray()
        self._task: asyncio.Task | None = None
        self._answered = False

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            super().data_received(data)
            return
        self._buf += data
        if self._mode == "sniff":
            space = self._buf.find(b" ")
            if space < 0 and len(self._buf) < 8:
                return   # not even the method yet
            if bytes(self._buf[:space]) not in METHODS:
                self._mode = "ws"   # GET (or garbage): websockets' own parser answers it
                data, self._buf = bytes(self._buf), bytearray()
                super().data_received(data)
                return
            self._mode = "http"
        if not self._answered:
            self._try_request()

    def eof_received(self) -> bool | None:
        if self._mode == "ws":
            return super().eof_received()
        return True   # a client that half-closes after its request still gets the answer

    def _try_request(self) -> None:
        head_end = self._buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                self._reply(response(431, "request head too large\n"))
            return
        try:
            request_line, *lines = self._buf[:head_end].decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            if not version.startswith("HTTP/1.") or not target.startswith("/"):
                raise ValueError(request_line)
            headers = Headers()
            for line in lines:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise ValueError(line)
                headers[name] = value.strip()
        except ValueError:
            self._reply(response(400, "malformed HTTP request\n"))
            return
        if "Transfer-Encoding" in headers:
            self._reply(response(411, "send the body with a Content-Length (chunked bodies are not accepted)\n"))
            return
        try:
            length = int(headers.get("Content-Length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            self._reply(response(400, "Content-Length must be one non-negative integer\n"))
            return
        if length > MAX_BODY_BYTES:
            self._reply(response(413, f"request body of {length} bytes is over the limit ({MAX_BODY_BYTES})\n"))
            return
        body_start = head_end + 4
        if len(self._buf) - body_start < length:
            return   # wait for the rest of the body
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        local = self.transport.get_extra_info("sockname") if self.transport is not None else None
        request = HttpRequest(method, target, headers, bytes(self._buf[body_start:body_start + length]),
                              remote=str(peer[0]) if peer else "?", local=str(local[0]) if local else "")
        self._buf = bytearray()
        self._answered = True   # whatever else the client sends is ignored
        self._task = self.loop.create_task(self._answer(request), name=f"http-{method}")

    async def _answer(self, request: HttpRequest) -> None:
        try:
            reply = await self._router(request)
        except MultipleValuesError as exc:   # e.g. two Authorization headers: ambiguous, refuse
            reply = response(400, f"header {exc} given more than once\n")
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.route)
            reply = response(500, "internal error\n")
        if request.method == "HEAD":
            reply.body = b""
        self._reply(reply)

    def _reply(self, reply: Response) -> None:
        self._answered = True
        if "Server" not in reply.headers:
            reply.headers["Server"] = "emo-stream"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.serialize())
            self.transport.close()
