"""The avatar worker: one process per GPU, one StreamingEngine, every room it serves batched together.

Built on livekit-agents' AgentServer with the THREAD job executor (each job is a thread with its own
event loop, all sharing this process's engine through EngineHost). It registers under an agent name
(explicit dispatch: AvatarSession dispatches it into a room with the portrait in the metadata),
reports its load as sessions / capacity, turns a job down (without terminating it, so LiveKit offers
it to another worker) when every slot is taken, and drains on SIGTERM: no new jobs, current ones
finish (up to `drain_timeout` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobExecutorType, JobRequest
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

from emo_stream.errors import ConfigError, EmoStreamError, ImageInputError
from emo_stream.livekit.host import EngineHost
from emo_stream.livekit.job import run_avatar_job
from emo_stream.livekit.metadata import MAX_IMAGE_BYTES, DispatchInfo, decode_image, fetch_image
from emo_stream.livekit.url_fetch import UrlPolicy
from emo_stream.streaming import AvatarHandle

log = logging.getLogger(__name__)

DEFAULT_AGENT_NAME = "emo-stream"


@dataclass
class WorkerConfig:
    """How the worker joins LiveKit. Empty url/key/secret: LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET."""

    url: str | None = None
    api_key: str | None = None
    api_secret: str | None = field(default=None, repr=False)   # never in a repr (logs, tracebacks)
    agent_name: str = DEFAULT_AGENT_NAME
    default_avatar: str | None = None              # portrait path; None: the built-in portrait
    avatars: dict[str, str] = field(default_factory=dict)   # NAME -> portrait path (metadata "avatar")
    drain_timeout: int = 1800                      # seconds current rooms may keep going after SIGTERM
    http_port: int = 8081                          # livekit-agents' health endpoint (0: any free port)
    http_host: str = "127.0.0.1"                   # ... on loopback unless configured (it reports load)
    image_hosts: tuple[str, ...] = ()              # hosts portrait URLs may name (empty: any public host)
    image_networks: tuple[str, ...] = ()           # non-public networks portrait URLs may reach anyway
    idle_threads: int = 1                          # job threads kept warm
    max_retry: int = 16                            # failed connection attempts before giving up (livekit-agents'
                                                   # max_retry; the waits between them grow to 10 s)

    def validate(self) -> "WorkerConfig":
        for name, path in self.avatars.items():
            if not Path(path).is_file():
                raise ConfigError(f"--avatar {name}={path}: file not found")
        if self.default_avatar and not Path(self.default_avatar).is_file():
            raise ConfigError(f"--default-avatar {self.default_avatar}: file not found")
        if not self.agent_name:
            raise ConfigError("the agent name must not be empty (explicit dispatch needs it)")
        if not isinstance(self.max_retry, int) or self.max_retry < 0:
            raise ConfigError(f"--max-retry must be an integer >= 0: got {self.max_retry!r}")
        self.url_policy()   # bad --image-network: one line now, not at the first job
        return self

    def url_policy(self) -> UrlPolicy:
        """Where dispatch metadata's image_url may lead (emo_stream.livekit.url_fetch)."""
        return UrlPolicy(hosts=tuple(self.image_hosts), networks=tuple(self.image_networks),
                         max_bytes=MAX_IMAGE_BYTES)


class AvatarWorker:
    """Accepts avatar jobs while it has a free engine slot and runs each in its own job thread."""

    def __init__(self, host: EngineHost, config: WorkerConfig | None = None) -> None:
        self.host = host
        self.config = (config or WorkerConfig()).validate()
        self._reserved: set[str] = set()
        self._senders: set[str] = set()    # agent identities of the rooms being served
        self.server: AgentServer | None = None

    # ------------------------------------------------------------------ LiveKit wiring

    def build_server(self) -> AgentServer:
        cfg = self.config
        server = AgentServer(
            job_executor_type=JobExecutorType.THREAD,   # every room in this process: one engine, batched
            load_threshold=1.0,                         # load = sessions / capacity: full at 1.0
            load_fnc=lambda: self.host.load,
            drain_timeout=cfg.drain_timeout,
            num_idle_processes=cfg.idle_threads,
            ws_url=cfg.url or None,
            api_key=cfg.api_key or None,
            api_secret=cfg.api_secret or None,
            host=cfg.http_host,
            port=cfg.http_port,
            # one attempt more than asked: the library keeps no cause for its last failure, so ConnectionFailures
            # (which sees each failure's cause) gives up on the library's behalf after max_retry retries
            max_retry=cfg.max_retry + 1,
        )
        server.rtc_session(self.entrypoint, agent_name=cfg.agent_name, on_request=self.on_request)
        self.server = server
        return server

    async def on_request(self, request: JobRequest) -> None:
        """Accept a job only with a free slot; a full worker declines without terminating the job, so
        LiveKit's dispatcher offers it to another worker."""
        try:
            info = DispatchInfo.from_json(request.job.metadata)
        except ConfigError as exc:
            log.error("job %s in room %s: bad dispatch metadata: %s", request.id, request.room.name, exc)
            await request.reject(terminate=True)
            return
        if info.sender_identity and info.sender_identity in self._senders:
            # livekit-agents keys its avatar RPC handlers by the caller's identity per process: two rooms
            # whose agents share an identity must not share a worker process
            log.warning("job %s (room %s) turned down: this worker already serves an agent named %s",
                        request.id, request.room.name, info.sender_identity)
            await request.reject(terminate=False)
            return
        if not self.host.reserve():
            if not self.host.healthy:
                status = self.host.engine.health.status()
                log.error("job %s (room %s) turned down: the engine is unhealthy (%s: %s)", request.id,
                          request.room.name, status["status"], status["reason"])
            else:
                log.info("job %s (room %s) turned down: all %d slots in use", request.id, request.room.name,
                         self.host.capacity)
            await request.reject(terminate=False)
            return
        self._reserved.add(request.id)
        if info.sender_identity:
            self._senders.add(info.sender_identity)
        attributes = {}
        if info.mode == "agent" and info.sender_identity:
            attributes[ATTRIBUTE_PUBLISH_ON_BEHALF] = info.sender_identity
        try:
            await request.accept(identity=info.avatar_identity, name="emo-stream avatar", attributes=attributes)
        except BaseException:
            if request.id in self._reserved:
                self._reserved.discard(request.id)
                self._senders.discard(info.sender_identity or "")
                self.host.release()
            raise

    async def entrypoint(self, ctx: JobContext) -> None:
        """Job thread: connect, prepare the portrait (once per worker), animate until the agent leaves."""
        if ctx.job.id in self._reserved:
            self._reserved.discard(ctx.job.id)
        elif not self.host.reserve():      # launched without on_request (e.g. simulate_job)
            log.warning("job %s: no free slot", ctx.job.id)
            ctx.shutdown("worker full")
            return
        info: DispatchInfo | None = None
        running = False      # run_avatar_job gives the slot back itself
        reason = "avatar finished"
        try:
            info = DispatchInfo.from_json(ctx.job.metadata)
            await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY if info.mode == "talk"
                              else AutoSubscribe.SUBSCRIBE_NONE)
            avatar = await self.avatar_for(info)
            running = True
            await run_avatar_job(ctx.room, self.host, info, avatar)
        except EmoStreamError as exc:     # bad portrait, no face, full engine: this room only
            log.error("job %s (room %s): %s", ctx.job.id, ctx.job.room.name, exc)
            reason = str(exc)
        finally:
            if not running:
                self.host.release()
            if info is not None and info.sender_identity:
                self._senders.discard(info.sender_identity)
            ctx.shutdown(reason)

    # ------------------------------------------------------------------ portraits

    async def avatar_for(self, info: DispatchInfo) -> AvatarHandle:
        """The job's portrait, loaded and prepared once per worker (cached by URL / content / name)."""
        key = info.image_key() or "default"
        return await self.host.prepare_avatar(key, lambda: self._load_image(info))

    def _load_image(self, info: DispatchInfo) -> np.ndarray:
        # every image, the operator's files too, is decoded in the host's portrait pool: a job loading
        # one must not take the CPU from rooms already streaming
        pool = self.host.pool
        if info.image_b64:
            return decode_image(info.image_b64, pool=pool)
        if info.image_url:
            return fetch_image(info.image_url, self.config.url_policy(), pool=pool)
        if info.avatar:
            path = self.config.avatars.get(info.avatar)
            if path is None:
                raise ImageInputError(f"unknown avatar {info.avatar!r}: this worker has "
                                      f"{', '.join(sorted(self.config.avatars)) or 'no named avatars'}")
            return _load_file(path, pool)
        if self.config.default_avatar:
            return _load_file(self.config.default_avatar, pool)
        from emo_stream.default_avatar import default_portrait

        return default_portrait(self.host.size)

    # ------------------------------------------------------------------ run until SIGTERM

    async def serve(self) -> None:
        """Register with LiveKit and run; SIGTERM / SIGINT drain (no new jobs, current ones finish),
        a second signal stops at once."""
        server = self.build_server()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(sig: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("%s: draining (no new rooms; current ones finish, up to %d s); again to stop now",
                         signal.Signals(sig).name, self.config.drain_timeout)
                stop.set()
            else:
                log.warning("second signal: stopping now")
                for task in asyncio.all_tasks(loop):
                    if task is not asyncio.current_task(loop):
                        task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        failures = ConnectionFailures(self.config.url or os.environ.get("LIVEKIT_URL") or "", self.config.max_retry)
        library_log = logging.getLogger("livekit.agents")
        library_log.addFilter(failures)
        run = asyncio.ensure_future(server.run(devmode=False))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                try:
                    run.result()
                except RuntimeError as exc:
                    if "failed to connect to livekit" in str(exc):
                        raise EmoStreamError(failures.gave_up()) from None
                    raise
                return
            try:
                await server.drain()
            except asyncio.TimeoutError:
                log.warning("drain timed out after %d s: closing the remaining rooms", self.config.drain_timeout)
        finally:
            library_log.removeFilter(failures)
            stopped.cancel()
            await server.aclose()
            if not run.done():
                run.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def status(self) -> dict[str, Any]:
        return {"capacity": self.host.capacity, "free": self.host.free_slots, "load": self.host.load}


def _load_file(path: str, pool) -> np.ndarray:
    """An operator's portrait file, decoded in the portrait pool like any other image."""
    from emo_stream.media import MAX_FILE_PIXELS

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageInputError(f"cannot read the portrait {path}: {exc.strerror or exc}") from None
    return pool.decode(data, what=f"portrait {path}", max_pixels=MAX_FILE_PIXELS).image


def public_url(url: str) -> str:
    """The server URL as it may be logged: no user:password, no query (tokens), no fragment."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:   # not a number: leave it out rather than fail while reporting another failure
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def connection_cause(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in a few words: 'Connection refused', 'HTTP 401 ...', not a repr."""
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 400:
        hint = " (the API key or secret was refused)" if status in (401, 403) else ""
        return f"HTTP {status}{hint}"
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, OSError):
        # asyncio puts "Connect call failed (addr)" in strerror; the errno's own text says what happened
        if os_error.errno:
            return os.strerror(os_error.errno)
        if os_error.strerror:
            return os_error.strerror
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WorkerConnectionError(EmoStreamError):
    """The worker could not reach its LiveKit server within --max-retry retries."""


class ConnectionFailures(logging.Filter):
    """livekit-agents says "failed to connect to livekit, retrying in 10s" with neither the URL nor the cause
    (both are in the record's extra fields). Each such record is replaced by one line of ours naming them."""

    def __init__(self, url: str, max_retry: int) -> None:
        super().__init__()
        self.url = public_url(url) if url else "(no LiveKit URL)"
        self.max_retry = max_retry
        self.count = 0
        self.last_cause = "unknown error"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], WorkerConnectionError):
            return False   # the library's traceback of our own giving up: serve() reports it in one line
        if not str(record.msg).startswith("failed to connect to livekit, retrying"):
            return True
        self.count += 1
        self.last_cause = connection_cause(getattr(record, "error", None))
        if self.count > self.max_retry:
            # raised inside the library's retry loop (it logs from its except block): the connection task ends
            # with this, and AgentServer.run() raises it
            raise WorkerConnectionError(self.gave_up())
        if self.count == 1:
            log.error("cannot connect to LiveKit at %s: %s; retrying (%d more attempts, --max-retry)", self.url,
                      self.last_cause, self.max_retry)
        else:
            log.warning("still cannot connect to LiveKit at %s: %s (attempt %d of %d)", self.url, self.last_cause,
                        self.count, self.max_retry + 1)
        return False   # ours replaces the library's line

    def gave_up(self) -> str:
        attempts = self.max_retry + 1
        cause = self.last_cause
        return (f"could not connect to LiveKit at {self.url} after {attempts} attempt{'s' * (attempts > 1)}: {cause} "
                "(check the URL and that the server is up; --max-retry sets the attempts)")
