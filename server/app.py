"""The streaming server: one asyncio process serving pages, WebRTC signalling and the bot API on one port."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from emo_stream.backend import Backend
from emo_stream.errors import ConfigError, EmoStreamError
from emo_stream.streaming import StreamingEngine

from server.avatars import AvatarStore
from server.config import ServerConfig
from server.auth import ADMIN, RedactingLogger
from server.http import HttpRoutes
from server.http_requests import HttpConnection
from server.sessions import SessionManager
from server.sync import Clock, MonotonicClock
from server.whip import WebRtcHttp
from server.ws_api import ApiContext, Connection

log = logging.getLogger(__name__)


def build_engine(config: ServerConfig, clock: Clock, backend: Backend | None = None) -> StreamingEngine:
    """Backend by name (emo_stream.registry) inside the streaming engine; model loading happens here."""
    from emo_stream.backend import capabilities
    from emo_stream.registry import create_backend, default_backend, model_options

    if backend is None:
        options = model_options(config.backend or default_backend(config.model), steps=config.steps,
                                guidance=config.guidance, decoder=config.decoder, weights=config.weights)
        backend = create_backend(config.backend, config.model, size=config.size, fps=config.fps,
                                 device=config.device, **options)
    # the latency knob suits each backend differently: one frame for the cheap preview animator, longer
    # segments for EMO (temporal context, batching)
    segment = config.engine.segment_frames or capabilities(backend).stream_segment_frames or 8
    if config.sessions.max_sessions is None:
        # not given: on CUDA the fewer of what the free memory holds (the family's counted profile) and what the
        # device computes in real time (a start-up calibration, cached); 4 off CUDA unless a calibration is asked
        from emo_stream.streaming.capacity import default_capacity

        model = {k: getattr(config, k) for k in ("model", "steps", "guidance", "decoder", "weights")}
        config.sessions.max_sessions, why = default_capacity(
            backend, segment_frames=segment, max_batch=config.engine.max_batch, mode=config.sessions.calibrate,
            avatar=lambda: backend.prepare_avatar(default_image(config)), config=model)
        log.info("max_sessions %s", why)
    engine_config = config.engine.engine_config(segment, config.sessions.max_sessions, config.limits.max_avatars)
    return StreamingEngine(backend, engine_config, clock=clock)


def default_image(config: ServerConfig):
    if config.avatar:
        from emo_stream.media import is_video_path, load_image, load_video

        if is_video_path(config.avatar):   # a short idle video (backends with video avatars: musetalk)
            return load_video(config.avatar, fps=config.fps)
        return load_image(config.avatar)
    from emo_stream.default_avatar import default_portrait

    return default_portrait(max(config.size, 256))  # painted large enough for face detection; framed to size later


def preload_webrtc() -> bool:
    """Import the WebRTC stack (aiortc, its codecs) now: imported by the first talk page's start it cost that
    session 0.2-0.4 s of its first frame on a 2-core CPU. False where aiortc is not installed (WebSocket only)."""
    try:
        import server.rtc  # noqa: F401
    except ImportError as exc:
        log.info("WebRTC is unavailable (%s): the WebSocket API still works", exc)
        return False
    return True


def reachable_address() -> str:
    """This machine's address on the network it would route to (no packet is sent); loopback when none."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def check_port_free(host: str, port: int) -> None:
    """Fail at once when another program holds the port (the real bind comes after the engine starts)."""
    import socket

    if not port:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server will
            probe.bind(address)
    except OSError as exc:
        raise EmoStreamError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def poster_jpeg(image, size: int) -> bytes:
    """The default portrait as a JPEG (longer side at most `size`): the talk page shows it before Start."""
    import io

    from PIL import Image

    picture = Image.fromarray(image[0] if image.ndim == 4 else image)   # a video avatar: its first frame
    picture.thumbnail((size, size))
    buf = io.BytesIO()
    picture.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class StreamServer:
    """`await start()`, then `url`; `await stop()`. Tests may pass a ready backend or engine, and a clock."""

    def __init__(self, config: ServerConfig, *, backend: Backend | None = None, engine: StreamingEngine | None = None,
                 clock: Clock | None = None, virtual_camera: bool = False, portrait_pool: Any = None):
        """portrait_pool: an emo_stream.portrait_pool.PortraitPool to share (tests); by default the server
        makes its own from limits.decode_* and closes it on stop()."""
        config.ensure_token()
        self.config = config
        self.clock = clock or MonotonicClock()
        self.engine = engine
        self._backend = backend
        self.virtual_camera = virtual_camera
        self.sessions: SessionManager | None = None
        self.avatars: AvatarStore | None = None
        self.started = time.time()
        self.port = config.port
        self._server: Server | None = None
        self._camera: Any = None
        self._poster: bytes | None = None
        self._api: ApiContext | None = None
        self.webrtc_http: WebRtcHttp | None = None   # WHIP and WHEP
        self.routes = HttpRoutes(config, None, self.health)   # replaced in start(), with the sessions
        self._connections = 0
        self._portrait_pool = portrait_pool
        self._own_pool = False
        self._per_address: dict[str, int] = {}   # open WebSocket connections per client address

    @property
    def backend_name(self) -> str:
        if self.engine is not None:
            return str(self.engine.backend.name)
        return self.config.backend or "preview"

    @property
    def base_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = reachable_address()  # 0.0.0.0 in a URL is no address another machine can open
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.config.tls else 'http'}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The talk page's URL (with the token when one is needed)."""
        suffix = f"/?token={self.config.token}" if self.config.auth_required and self.config.token else "/"
        return self.base_url + suffix

    def viewer_url(self, session_id: str) -> str:
        """The OBS viewer's URL: it carries the viewer token, which opens this page and nothing else."""
        url = f"{self.base_url}/viewer?session={session_id}"
        if self.config.auth_required and self.config.token:
            url += f"&token={self.routes.viewer_token}"
        return url

    def health(self) -> dict:
        """/healthz: status "ok" (HTTP 200), else "starting", or the engine's "device_error" / "stalled" with a reason
        (HTTP 503; emo_stream.streaming.faults)."""
        engine = getattr(self.engine, "health", None)
        engine = engine.status() if engine is not None else {"status": "ok", "reason": None}
        status = "starting" if self._server is None else engine["status"]
        return {
            "status": status,
            "reason": engine.get("reason"),
            "backend": self.backend_name,
            "sessions": len(self.sessions) if self.sessions else 0,
            "max_sessions": self.config.sessions.max_sessions,
            "viewers": sum(s.viewers for s in self.sessions.all()) if self.sessions else 0,
            "connections": self._connections,
            "size": self.config.size,
            "fps": self.config.fps,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def start(self) -> None:
        cfg = self.config
        check_port_free(cfg.host, cfg.port)  # before minutes of model loading, not after
        if self.engine is None:
            self.engine = await asyncio.to_thread(build_engine, cfg, self.clock, self._backend)
        await self.engine.start()
        if self._portrait_pool is None:   # its workers start with the first upload
            from emo_stream.portrait_pool import PortraitPool

            self._portrait_pool = PortraitPool(cfg.limits.pool_limits())
            self._own_pool = True
        self.avatars = AvatarStore(self.engine, cfg.limits.max_avatars, cfg.limits.max_image_pixels,
                                   pool=self._portrait_pool, uploads_per_minute=cfg.limits.avatar_uploads_per_minute)
        if getattr(self.engine, "avatars", None) is not None:   # an engine's AvatarCache (not a test stand-in)
            self.engine.avatars.max_per_owner = cfg.limits.max_avatars_per_client
        image = await asyncio.to_thread(default_image, cfg)
        await self.avatars.set_default(image)
        self._poster = await asyncio.to_thread(poster_jpeg, image, cfg.size)
        if cfg.sessions.max_sessions is None:
            # an engine built elsewhere (embedding, tests): its own session limit, else the CPU default 4
            cfg.sessions.max_sessions = getattr(getattr(self.engine, "config", None), "max_sessions", None) or 4
        await asyncio.to_thread(preload_webrtc)
        self.sessions = SessionManager(self.engine, cfg, self.clock)
        self.routes = HttpRoutes(cfg, self.sessions, self.health, poster=lambda: self._poster)
        self._api = ApiContext(cfg, self.sessions, self.avatars, self.viewer_url,
                               role_of=lambda ws: self.routes.role(ws.request) or ADMIN,
                               address_of=lambda ws: self.routes.client_address(ws, ws.request))
        try:
            self._server = await self._listen()
        except OSError as exc:
            await self.engine.stop()
            raise EmoStreamError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        self.sessions.start()
        self.port = self._server.sockets[0].getsockname()[1]
        self.routes.local_port = self.port
        if self.virtual_camera:
            from server.virtual_camera import VirtualCamera

            self._camera = VirtualCamera.try_start(self.sessions, cfg.size, cfg.fps)
        log.info("serving on %s (backend %s, %d sessions max)", self.base_url, self.backend_name,
                 cfg.sessions.max_sessions)

    async def _listen(self) -> Server:
        cfg = self.config
        routes = self.routes
        self.webrtc_http = WebRtcHttp(cfg, self.sessions, self.avatars, routes)
        ssl_context = None
        if cfg.tls:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"cannot use tls_cert/tls_key: {exc}") from None
        return await serve(
            self._handle, cfg.host, cfg.port,
            process_request=routes,
            logger=RedactingLogger(logging.getLogger("websockets.server"), routes.secrets),   # no tokens in -v logs
            # POST/DELETE/PATCH/OPTIONS (WHIP, WHEP) are answered by HttpConnection, GET goes on to websockets
            create_connection=functools.partial(HttpConnection, router=self.webrtc_http),
            # the largest legal message (an avatar upload, by default), and while Connection is busy with one
            # (audio backpressure, an upload being prepared) websockets reads no further than one more
            # message: a waiting connection holds at most ~3 of them (max_queue=16 let one hold 16: +142 MiB)
            max_size=max(cfg.limits.max_upload_bytes, cfg.limits.max_audio_chunk_bytes, cfg.limits.max_text_bytes),
            max_queue=(1, 0),
            ping_interval=None,  # server.ws_api.Connection pings: it tells a slow reader from a stopped one
            # a client that stopped reading never completes the closing handshake: without this its
            # session would outlive a failed keepalive by websockets' default 10 s
            close_timeout=cfg.keepalive.close_timeout_s,
            compression=None,  # audio and JPEG do not compress; save the CPU
            server_header="emo-stream",
            ssl=ssl_context,
        )

    async def _handle(self, ws: ServerConnection) -> None:
        address = self.routes.client_address(ws, ws.request)   # the forwarded one behind a trusted proxy
        # checked and counted with no await in between: connections arriving together cannot all pass
        limit = self.config.limits.max_connections_per_address
        if self._per_address.get(address, 0) >= limit:
            log.info("refusing a connection from %s: it has %d open (limits.max_connections_per_address)",
                     address, limit)
            await ws.close(1013, f"too many connections from this address (limit {limit}); try again later")
            return
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._connections += 1
        try:
            await Connection(self._api, ws).run()
        except Exception:  # one broken connection never takes the server (or other sessions) down
            log.exception("connection failed")
        finally:
            self._connections -= 1
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def stop(self) -> None:
        if self._camera is not None:
            self._camera.stop()
        if self._server is not None:
            self._server.close()
        if self.webrtc_http is not None:
            await self.webrtc_http.close_all()
        if self.sessions is not None:
            await self.sessions.close_all()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self.engine is not None:
            await self.engine.stop()
        if self._own_pool and self._portrait_pool is not None:
            self._portrait_pool.close()
