"""AvatarSession: give a LiveKit voice agent an emo-stream face, like the other avatar plugins.

    from emo_stream.livekit import AvatarSession

    avatar = AvatarSession(avatar="me.jpg")            # a path, an http(s) URL, an RGB array, or None
    await avatar.start(session, room=ctx.room)         # before session.start(...)

start() dispatches an `emo-stream worker` into the room (LiveKit's agent dispatch API, agent name
`emo-stream` by default) with the portrait and seed in the dispatch metadata, and routes the agent's
audio to it with livekit-agents' DataStreamAudioOutput; the worker publishes the avatar's video and
that audio on the agent's behalf.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from livekit import api, rtc
from livekit.agents.job import get_job_context
from livekit.agents.voice.avatar import AvatarSession as _AvatarSessionBase
from livekit.agents.voice.avatar import DataStreamAudioOutput

from emo_stream.errors import ImageInputError
from emo_stream.livekit.metadata import DEFAULT_SAMPLE_RATE, DispatchInfo, encode_image
from emo_stream.livekit.worker import DEFAULT_AGENT_NAME

log = logging.getLogger(__name__)


class AvatarSession(_AvatarSessionBase):
    """An emo-stream avatar in the agent's room, served by an `emo-stream worker` (see docs/livekit.md)."""

    def __init__(self, *, avatar: str | Path | np.ndarray | bytes | None = None, seed: int = 0,
                 agent_name: str = DEFAULT_AGENT_NAME, avatar_identity: str | None = None,
                 worker_avatar: str | None = None, sample_rate: int = DEFAULT_SAMPLE_RATE,
                 max_redispatch: int = 3) -> None:
        """avatar: portrait path, http(s) URL (the worker downloads it), RGB uint8 array or image bytes;
        None: the worker's default portrait. worker_avatar: a portrait the worker was started with
        (`emo-stream worker --avatar NAME=PATH`). agent_name: the workers' registered name.
        max_redispatch: how often a worker that left the room unexpectedly (crashed, lost its network) is
        replaced by dispatching the avatar again (LiveKit places it on a worker with a free slot)."""
        super().__init__()
        self._identity = avatar_identity or f"emo-stream-{uuid.uuid4().hex[:8]}"
        self._agent_name = agent_name
        self._seed = int(seed)
        self._sample_rate = int(sample_rate)
        self._worker_avatar = worker_avatar
        self._image_url: str | None = None
        self._image_b64: str | None = None
        if isinstance(avatar, str) and avatar.startswith(("http://", "https://")):
            self._image_url = avatar
        elif avatar is not None:
            self._image_b64 = encode_image(_as_rgb(avatar))
        self.dispatch_id: str | None = None
        self.dispatches = 0
        self._max_redispatch = max_redispatch
        self._dispatch_args: tuple | None = None
        self._audio_output: DataStreamAudioOutput | None = None
        self._closing = False
        self._watched_room: rtc.Room | None = None
        self._redispatch_tasks: set[asyncio.Task] = set()

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "emo-stream"

    def dispatch_info(self, sender_identity: str | None) -> DispatchInfo:
        return DispatchInfo(avatar_identity=self._identity, mode="agent", sender_identity=sender_identity,
                            image_url=self._image_url, image_b64=self._image_b64, avatar=self._worker_avatar,
                            seed=self._seed, sample_rate=self._sample_rate)

    async def start(self, agent_session: Any, room: rtc.Room, *, livekit_url: str | None = None,
                    livekit_api_key: str | None = None, livekit_api_secret: str | None = None) -> None:
        """Dispatch a worker into `room` and send the agent's audio to it. Call before session.start()."""
        await super().start(agent_session, room)
        job_ctx = get_job_context(required=False)
        # the agent's identity is known from its job token even before the room is connected
        agent_identity = job_ctx.local_participant_identity if job_ctx is not None else \
            room.local_participant.identity
        info = self.dispatch_info(agent_identity)
        self._dispatch_args = (room.name, info.to_json(), livekit_url, livekit_api_key, livekit_api_secret)
        await self._dispatch(*self._dispatch_args)
        self._audio_output = DataStreamAudioOutput(
            room, destination_identity=self._identity, sample_rate=self._sample_rate,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,
            wait_playback_start=True)   # playback starts when the worker publishes it (lk.playback_started)
        agent_session.output.audio = self._audio_output
        self._watched_room = room
        room.on("participant_disconnected", self._on_participant_disconnected)

    async def aclose(self) -> None:
        self._closing = True
        if self._watched_room is not None:
            self._watched_room.off("participant_disconnected", self._on_participant_disconnected)
            self._watched_room = None
        for task in list(self._redispatch_tasks):
            task.cancel()
        await super().aclose()

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        """The avatar left while the agent is still here: its worker died or lost the network. End the
        utterance it was playing (the agent would otherwise wait for its playback_finished forever) and
        dispatch the avatar again; the new worker joins under the same identity, so the agent's audio
        output keeps working."""
        room = self._watched_room
        if participant.identity != self._identity or self._closing or room is None or not room.isconnected():
            return
        if self._audio_output is not None:
            self._audio_output.clear_buffer()   # the RPC fails: pending playouts end as interrupted
        if self.dispatches > self._max_redispatch or self._dispatch_args is None:
            log.error("avatar %s left room %s again; not dispatching it any more (max_redispatch=%d)",
                      self._identity, room.name, self._max_redispatch)
            return
        log.warning("avatar %s left room %s unexpectedly: dispatching another worker", self._identity, room.name)
        task = asyncio.ensure_future(self._dispatch(*self._dispatch_args))
        self._redispatch_tasks.add(task)
        task.add_done_callback(self._redispatch_tasks.discard)

    async def _dispatch(self, room_name: str, metadata: str, url: str | None, key: str | None,
                        secret: str | None) -> None:
        request = api.CreateAgentDispatchRequest(agent_name=self._agent_name, room=room_name, metadata=metadata)
        job_ctx = get_job_context(required=False)
        if job_ctx is not None and not (url or key or secret):
            dispatch = await job_ctx.api.agent_dispatch.create_dispatch(request)
        else:
            lk = api.LiveKitAPI(url or os.environ.get("LIVEKIT_URL"), key or os.environ.get("LIVEKIT_API_KEY"),
                                secret or os.environ.get("LIVEKIT_API_SECRET"))
            try:
                dispatch = await lk.agent_dispatch.create_dispatch(request)
            finally:
                await lk.aclose()
        self.dispatch_id = dispatch.id
        self.dispatches += 1
        log.info("dispatched %s into room %s as %s (dispatch %s)", self._agent_name, room_name, self._identity,
                 dispatch.id)


def _as_rgb(avatar: str | Path | np.ndarray | bytes) -> np.ndarray:
    from emo_stream.media import PORTRAIT_MAX_SIDE, image_from_bytes, load_image

    if isinstance(avatar, np.ndarray):
        if avatar.dtype != np.uint8 or avatar.ndim != 3 or avatar.shape[2] != 3:
            raise ImageInputError("avatar array must be RGB uint8 of shape (H, W, 3)")
        return avatar
    if isinstance(avatar, (bytes, bytearray)):
        return image_from_bytes(bytes(avatar), PORTRAIT_MAX_SIDE)
    return load_image(avatar)
