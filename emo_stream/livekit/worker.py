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

    def validate(self) -> "WorkerConfig":
        for name, path in self.avatars.items():
            if not Path(path).is_file():
                raise ConfigError(f"--avatar {name}={path}: file not found")
        if self.default_avatar and not Path(self.default_avatar).is_file():
            raise ConfigError(f"--default-avatar {self.default_avatar}: file not found")
        if not self.agent_name:
            raise ConfigError("the agent name must not be empty (explicit dispatch needs it)")
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
        from emo_stream.media import load_image

        if info.image_b64:
            return decode_image(info.image_b64)
        if info.image_url:
            return fetch_image(info.image_url, self.config.url_policy())
        if info.avatar:
            path = self.config.avatars.get(info.avatar)
            if path is None:
                raise ImageInputError(f"unknown avatar {info.avatar!r}: this worker has "
                                      f"{', '.join(sorted(self.config.avatars)) or 'no named avatars'}")
            return load_image(path)
        if self.config.default_avatar:
            return load_image(self.config.default_avatar)
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
        run = asyncio.ensure_future(server.run(devmode=False))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                run.result()
                return
            try:
                await server.drain()
            except asyncio.TimeoutError:
                log.warning("drain timed out after %d s: closing the remaining rooms", self.config.drain_timeout)
        finally:
            stopped.cancel()
            await server.aclose()
            if not run.done():
                run.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def status(self) -> dict[str, Any]:
        return {"capacity": self.host.capacity, "free": self.host.free_slots, "load": self.host.load}
