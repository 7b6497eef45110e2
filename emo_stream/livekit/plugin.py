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
                 worker_avatar: str | None = None, sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
        """avatar: portrait path, http(s) URL (the worker downloads it), RGB uint8 array or image bytes;
        None: the worker's default portrait. worker_avatar: a portrait the worker was started with
        (`emo-stream worker --avatar NAME=PATH`). agent_name: the workers' registered name."""
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
        info = self.dispatch_info(room.local_participant.identity)
        await self._dispatch(room.name, info.to_json(), livekit_url, livekit_api_key, livekit_api_secret)
        agent_session.output.audio = DataStreamAudioOutput(
            room, destination_identity=self._identity, sample_rate=self._sample_rate,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO)

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
        log.info("dispatched %s into room %s as %s (dispatch %s)", self._agent_name, room_name, self._identity,
                 dispatch.id)


def _as_rgb(avatar: str | Path | np.ndarray | bytes) -> np.ndarray:
    from emo_stream.media import image_from_bytes, load_image

    if isinstance(avatar, np.ndarray):
        if avatar.dtype != np.uint8 or avatar.ndim != 3 or avatar.shape[2] != 3:
            raise ImageInputError("avatar array must be RGB uint8 of shape (H, W, 3)")
        return avatar
    if isinstance(avatar, (bytes, bytearray)):
        return image_from_bytes(bytes(avatar))
    return load_image(avatar)
