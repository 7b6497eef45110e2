"""EmoStreamVideoService: a pipecat service that turns the agent's TTS audio into a talking avatar.

Placed after the TTS service (like pipecat's Simli, Tavus and HeyGen services), it takes every
`TTSAudioRawFrame`, sends it to an emo-stream avatar (LocalAvatar: in this process; RemoteAvatar: a
server over its WebSocket API) and pushes what the avatar renders downstream:

    per frame: OutputImageRawFrame (sync_with_audio=True), then the TTSAudioRawFrame of the audio it covers

so the output transport shows each picture as its own audio starts playing (it queues synced images
with the audio). The audio pushed is the avatar's copy of the speech, 16 kHz mono, cut at the frame
boundaries: picture and sound come from one timeline. Between utterances the idle avatar (blinks,
small motion) keeps coming, so the agent is seen listening. `TTSStoppedFrame` is held back until the
utterance's last frame has gone out, so "bot stopped speaking" follows the picture, not the TTS.

An `InterruptionFrame` clears the avatar at once: its queued audio and speech frames are dropped and
speech frames rendered before the interrupt are never pushed (the output transport drops what it had
queued itself); idle frames follow. Errors (server unreachable or gone, engine failure) are pushed
upstream as pipecat `ErrorFrame`s; the rest of the pipeline goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import numpy as np
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService

from emo_stream.pipecat.avatars import AvatarFrame, AvatarLinkError, LocalAvatar, RemoteAvatar, pcm16
from emo_stream.timeline import SAMPLE_RATE

log = logging.getLogger(__name__)

METADATA_KEY = "emo_stream"   # frame.metadata[METADATA_KEY] = {"index", "speech", "segment_end"}


class EmoStreamVideoService(AIService):
    """A self-hosted emo-stream avatar as a pipecat video service.

        avatar = EmoStreamVideoService(avatar=RemoteAvatar("http://gpu-box:8080", token=TOKEN))
        pipeline = Pipeline([transport.input(), stt, llm, tts, avatar, transport.output()])

    `avatar`: a LocalAvatar or RemoteAvatar (emo_stream.pipecat.avatars), opened on StartFrame and
    closed on EndFrame/CancelFrame.
    """

    def __init__(self, *, avatar: LocalAvatar | RemoteAvatar, **kwargs: Any):
        from pipecat.services.settings import ServiceSettings

        kwargs.setdefault("settings", ServiceSettings(model=None))   # no model to choose: the avatar decides
        super().__init__(**kwargs)
        self._avatar = avatar
        self._opened = False
        self._pump_task: asyncio.Task | None = None
        self._resampler: Any = None
        self._resampler_rate: int | None = None
        self._epoch = 0                       # +1 per interruption: older speech frames are stale
        self._speaking_input = False          # TTS audio sent since the last end of speech
        self._held_stops: deque[TTSStoppedFrame] = deque()   # wait for their utterance's last frame
        self._utterances_open = 0             # utterances sent to the avatar whose last frame is still to come
        self._failed = False
        self._ready = asyncio.Event()          # set once the avatar is open (or failed to open)
        self._started_down = asyncio.Event()   # StartFrame has gone downstream: frames may follow it

    def can_generate_metrics(self) -> bool:
        return False

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        # opening (connecting, preparing the portrait) runs beside the pipeline: StartFrame goes on at once
        self._pump_task = self.create_task(self._pump(), name="emo-stream-frames")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        self._ready.set()   # nothing waits for an avatar that will not come
        if self._pump_task is not None:
            await self.cancel_task(self._pump_task)
            self._pump_task = None
        if self._opened or not self._failed:   # also when cancelled while opening
            self._opened = False
            try:
                await self._avatar.close()
            except Exception:
                log.debug("closing the avatar failed", exc_info=True)

    # -- frames in ----------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._started_down.set()
            return
        if isinstance(frame, TTSAudioRawFrame):
            await self._send_audio(frame)
            return   # replaced by the avatar's own audio, frame by frame
        if isinstance(frame, TTSStartedFrame):
            self._speaking_input = False
        elif isinstance(frame, TTSStoppedFrame):
            if await self._end_of_speech():
                self._held_stops.append(frame)
                return
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
        await self.push_frame(frame, direction)

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        await self._ready.wait()
        if not self._opened:
            return
        audio = frame.audio
        if frame.num_channels > 1:   # the avatar listens in mono
            x = np.frombuffer(audio, "<i2").reshape(-1, frame.num_channels).astype(np.int32)
            audio = x.mean(axis=1).astype("<i2").tobytes()
        if frame.sample_rate != SAMPLE_RATE:
            if self._resampler is None or self._resampler_rate != frame.sample_rate:
                self._resampler, self._resampler_rate = create_stream_resampler(), frame.sample_rate
            audio = await self._resampler.resample(audio, frame.sample_rate, SAMPLE_RATE)
        if not audio:
            return
        self._speaking_input = True
        try:
            await self._avatar.push_audio(audio)
        except AvatarLinkError as exc:
            await self._fail(exc)

    async def _end_of_speech(self) -> bool:
        """True when an utterance was sent: its TTSStoppedFrame then waits for the utterance's last frame."""
        await self._ready.wait()
        if not self._opened or not self._speaking_input:
            return False
        self._speaking_input = False
        self._utterances_open += 1
        try:
            await self._avatar.end_of_speech()
        except AvatarLinkError as exc:
            await self._fail(exc)
            return False
        return True

    async def _interrupt(self) -> None:
        self._epoch += 1
        self._speaking_input = False
        self._held_stops.clear()
        self._utterances_open = 0
        self._resampler = None
        if self._opened:
            try:
                await self._avatar.clear()
            except AvatarLinkError as exc:
                await self._fail(exc)

    # -- frames out ---------------------------------------------------------------------------------
    async def _pump(self) -> None:
        try:
            await self._avatar.open()
        except Exception as exc:
            self._failed = True
            self._ready.set()
            await self.push_error(f"emo-stream avatar could not start: {exc}", exception=exc)
            return
        self._opened = True
        self._ready.set()
        await self._started_down.wait()
        try:
            frames = self._avatar.frames().__aiter__()
            while True:
                epoch = self._epoch
                try:
                    frame: AvatarFrame = await frames.__anext__()
                except StopAsyncIteration:
                    return
                if frame.speech and epoch != self._epoch:
                    continue   # rendered before an interruption: never shown
                await self._push_avatar_frame(frame)
        except AvatarLinkError as exc:
            await self._fail(exc)

    async def _push_avatar_frame(self, frame: AvatarFrame) -> None:
        h, w = frame.image.shape[:2]
        image = OutputImageRawFrame(image=np.ascontiguousarray(frame.image).tobytes(), size=(w, h), format="RGB")
        image.sync_with_audio = True   # shown when the audio pushed before it has played
        image.metadata[METADATA_KEY] = {"index": frame.index, "speech": frame.speech,
                                        "segment_end": frame.segment_end}
        await self.push_frame(image)
        if frame.speech and len(frame.audio):
            audio = TTSAudioRawFrame(audio=pcm16(frame.audio), sample_rate=SAMPLE_RATE, num_channels=1)
            audio.metadata[METADATA_KEY] = {"index": frame.index}
            await self.push_frame(audio)
        if frame.segment_end and self._utterances_open:
            self._utterances_open -= 1
            if self._held_stops:
                await self.push_frame(self._held_stops.popleft())

    async def _fail(self, exc: Exception) -> None:
        if self._failed:
            return
        self._failed = True
        self._opened = False
        await self.push_error(f"emo-stream avatar: {exc}", exception=exc)
        while self._held_stops:   # nothing more will end those utterances
            await self.push_frame(self._held_stops.popleft())
