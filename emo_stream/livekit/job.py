"""One avatar job: a room, its engine session, livekit-agents' receiver and AvatarRunner.

Agent mode: the agent's TTS audio arrives through livekit-agents' own DataStreamAudioReceiver (the
`lk.audio_stream` byte streams, `lk.clear_buffer` / `lk.playback_finished` RPCs); talk mode: a
participant's microphone. AvatarRunner publishes our video and that audio in sync, on the agent's behalf.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from livekit import rtc
from livekit.agents import utils
from livekit.agents.voice.avatar import (
    AudioReceiver,
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    DataStreamAudioReceiver,
)

from emo_stream.livekit.generator import EngineVideoGenerator
from emo_stream.livekit.host import EngineHost
from emo_stream.livekit.metadata import DispatchInfo
from emo_stream.streaming import AvatarHandle

log = logging.getLogger(__name__)


class MicAudioReceiver(AudioReceiver):
    """Talk mode: a participant's microphone as the avatar's audio (no segments, no RPCs)."""

    def __init__(self, room: rtc.Room, *, identity: str | None, sample_rate: int) -> None:
        super().__init__()
        self._room = room
        self._identity = identity
        self._rate = sample_rate
        self._stream: rtc.AudioStream | None = None

    async def start(self) -> None:
        participant = await utils.wait_for_participant(room=self._room, identity=self._identity)
        publication = await utils.wait_for_track_publication(
            room=self._room, identity=participant.identity, kind=rtc.TrackKind.KIND_AUDIO,
            wait_for_subscription=True)
        self._stream = rtc.AudioStream.from_track(track=publication.track, sample_rate=self._rate, num_channels=1)
        log.info("talk mode: animating %s's microphone", participant.identity)

    def notify_playback_finished(self, playback_position: float, interrupted: bool) -> None:
        return None

    def notify_playback_started(self) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[rtc.AudioFrame | AudioSegmentEnd]:
        assert self._stream is not None, "start() first"
        async for event in self._stream:
            yield event.frame

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


async def run_avatar_job(room: rtc.Room, host: EngineHost, info: DispatchInfo, avatar: AvatarHandle, *,
                         on_started: Callable[[AvatarRunner, EngineVideoGenerator], Any] | None = None) -> None:
    """Serve one connected room until the sender leaves, the room disconnects or the pipeline fails.

    The caller has reserved a slot on `host`; it is given back when this returns, whatever happens.
    Raises what broke the pipeline (only this job ends: other rooms keep their sessions)."""
    session = None
    runner: AvatarRunner | None = None
    done = asyncio.Event()

    def on_participant_disconnected(p: rtc.RemoteParticipant) -> None:
        if info.sender_identity is not None and p.identity == info.sender_identity:
            log.info("room %s: %s left, ending the avatar", room.name, p.identity)
            done.set()
        elif info.sender_identity is None and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT \
                and info.mode == "agent":
            done.set()

    def on_disconnected(*_: Any) -> None:
        done.set()

    room.on("participant_disconnected", on_participant_disconnected)
    room.on("disconnected", on_disconnected)
    try:
        session = host.open_session(avatar, seed=info.seed)      # bound to this job's loop
        generator = EngineVideoGenerator(session, fps=host.fps, sample_rate=info.sample_rate)
        if info.mode == "agent":
            receiver: AudioReceiver = DataStreamAudioReceiver(room, sender_identity=info.sender_identity)
        else:
            receiver = MicAudioReceiver(room, identity=info.sender_identity, sample_rate=info.sample_rate)
        options = AvatarOptions(video_width=host.size, video_height=host.size, video_fps=host.fps,
                                audio_sample_rate=info.sample_rate, audio_channels=1)
        runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=options)
        generator.av_sync = runner.av_sync
        await runner.start()
        log.info("room %s: avatar %s running (session %s)", room.name, info.avatar_identity, session.id)
        if on_started is not None:
            on_started(runner, generator)
        pipeline = asyncio.ensure_future(runner.wait_for_complete())
        stopped = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait({pipeline, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if pipeline.done():
            pipeline.result()   # raises what failed
        else:
            pipeline.cancel()
    finally:
        room.off("participant_disconnected", on_participant_disconnected)
        room.off("disconnected", on_disconnected)
        if runner is not None:
            try:
                await runner.aclose()
            except Exception:
                log.exception("room %s: closing the avatar runner failed", room.name)
        if session is not None:
            await session.close()
        host.release()
