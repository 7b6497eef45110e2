"""EngineVideoGenerator: livekit-agents' VideoGenerator over one streaming-engine session.

AvatarRunner (livekit-agents) feeds it the agent's audio frames and `AudioSegmentEnd` markers and
publishes what it yields through an AVSynchronizer. We yield, per engine frame, the video frame and
then the audio it covers, so both tracks carry the same timeline.

The published audio is the agent's own samples, not the engine's 16 kHz copy: the engine places each
utterance on its 25 fps timeline frame by frame (frame k of an utterance covers its 16 kHz samples
[640 k, 640 (k + 1))), and we cut the original audio at the same frame boundaries (rate / fps samples
per frame), so what the room hears is sample-exact what the agent sent. An utterance's remainder is
flushed with its last frame (`segment_end`), followed by `AudioSegmentEnd`, which AvatarRunner turns
into the `lk.playback_finished` RPC with the played duration.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

from emo_stream.streaming import OutputFrame

log = logging.getLogger(__name__)

# Silence published before the first sound of an utterance that follows idle frames: the audio source
# is empty then and plays at once, while the first speaking frame still waits for the synchronizer's
# next video tick. Measured with bench/livekit_worker.py (see docs/livekit.md).
ONSET_DELAY_MS = 60.0


class _Utterance:
    """The original audio of one utterance, consumed frame by frame as the engine renders it."""

    def __init__(self, channels: int) -> None:
        self.chunks: deque[np.ndarray] = deque()
        self.queued = 0
        self.ended = False
        self.channels = channels

    def put(self, samples: np.ndarray) -> None:
        self.chunks.append(samples)
        self.queued += len(samples)

    def take(self, n: int | None) -> np.ndarray:
        """Up to n samples per channel (all when n is None), shape (m, channels) int16."""
        n = self.queued if n is None else min(n, self.queued)
        out: list[np.ndarray] = []
        need = n
        while need > 0:
            head = self.chunks[0]
            if len(head) <= need:
                out.append(self.chunks.popleft())
                need -= len(head)
            else:
                out.append(head[:need])
                self.chunks[0] = head[need:]
                need = 0
        self.queued -= n
        if not out:
            return np.zeros((0, self.channels), np.int16)
        return np.concatenate(out, axis=0)


class EngineVideoGenerator(VideoGenerator):
    """Drives one engine session (emo_stream.streaming.StreamSession, opened on this job's loop) for
    AvatarRunner."""

    def __init__(self, session: Any, *, fps: int, sample_rate: int, channels: int = 1,
                 onset_delay_ms: float = ONSET_DELAY_MS) -> None:
        self._session = session
        self._fps = fps
        self._rate = sample_rate
        self._channels = channels
        if sample_rate % fps:
            raise ValueError(f"audio sample rate {sample_rate} is not a whole number of samples per frame "
                             f"at {fps} fps")
        self._spf = sample_rate // fps
        self._utterances: deque[_Utterance] = deque()
        self._resampler: rtc.AudioResampler | None = None
        self._resampler_key: tuple[int, int] | None = None
        self._epoch = 0
        self.av_sync: rtc.AVSynchronizer | None = None   # set by the job: cleared on interrupt
        # set to a deque to record what is yielded, (kind, speech) per item (tests, benchmarks)
        self.trace: deque[tuple[str, bool]] | None = None
        self.cleared_at_trace: list[int] = []
        self._speaking = False
        self._warned_private = False
        self._onset_silence = np.zeros((int(sample_rate * onset_delay_ms / 1000), channels), np.int16)
        self._onset_pending = False

    # ------------------------------------------------------------------ input (AvatarRunner._read_audio)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            for resampled in self._flush_resampler():
                await self._push(resampled)
            if self._utterances and not self._utterances[-1].ended:
                self._utterances[-1].ended = True
                self._session.end_of_speech()
            return
        if frame.sample_rate != self._rate or frame.num_channels != self._channels:
            # another rate than announced: resample for publishing (no longer sample-exact)
            for resampled in self._resample(frame):
                await self._push(resampled)
            return
        await self._push(frame)

    async def _push(self, frame: rtc.AudioFrame) -> None:
        samples = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels).copy()
        if not len(samples):
            return
        if not self._utterances or self._utterances[-1].ended:
            self._utterances.append(_Utterance(self._channels))
        self._utterances[-1].put(samples)
        await self._session.push_audio(samples.reshape(-1), sample_rate=frame.sample_rate,
                                       channels=frame.num_channels)

    def _resample(self, frame: rtc.AudioFrame) -> list[rtc.AudioFrame]:
        key = (frame.sample_rate, frame.num_channels)
        if self._resampler is None or self._resampler_key != key:
            self._resampler = rtc.AudioResampler(frame.sample_rate, self._rate, num_channels=frame.num_channels)
            self._resampler_key = key
        out = self._resampler.push(frame)
        if frame.num_channels != self._channels:
            out = [_remix(f, self._channels) for f in out]
        return out

    def _flush_resampler(self) -> list[rtc.AudioFrame]:
        if self._resampler is None:
            return []
        out = self._resampler.flush()
        self._resampler = None
        if self._resampler_key and self._resampler_key[1] != self._channels:
            out = [_remix(f, self._channels) for f in out]
        return out

    # ------------------------------------------------------------------ interrupt (AvatarRunner._on_clear_buffer)

    async def clear_buffer(self) -> None:
        """Stop speaking now: drop the engine's queued audio and frames, our audio, and what the
        AVSynchronizer still holds (its audio source queue and video queue)."""
        self._epoch += 1
        self._utterances.clear()
        self._resampler = None
        if self.trace is not None:
            self.cleared_at_trace.append(len(self.trace))
        self._session.clear()
        if self.av_sync is not None:
            await self.av_sync.clear_queue()

    # ------------------------------------------------------------------ output (AvatarRunner._forward_video)

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        while True:
            epoch = self._epoch
            frame: OutputFrame | None = await self._session.next_frame()
            if frame is None:
                return
            if frame.speech and epoch != self._epoch:
                continue   # rendered before an interrupt: never shown
            if frame.speech and not self._speaking:
                self._skip_queued_idle_video()
                self._onset_pending = True
            self._speaking = frame.speech
            self._record("video", frame.speech)
            yield _video_frame(frame.image)
            if not frame.speech or epoch != self._epoch:
                continue   # idle, or interrupted while the runner was publishing this frame
            utterance = self._utterances[0] if self._utterances else None
            if utterance is None:
                continue
            samples = utterance.take(None if frame.segment_end else self._spf)
            if len(samples) and self._onset_pending and self.av_sync is not None and len(self._onset_silence):
                # straight into the synchronizer, not through AvatarRunner: not part of the playback position
                await self.av_sync.push(rtc.AudioFrame(self._onset_silence.tobytes(), self._rate, self._channels,
                                                       len(self._onset_silence)))
            self._onset_pending = False
            if len(samples):
                self._record("audio", True)
                yield rtc.AudioFrame(samples.tobytes(), self._rate, self._channels, len(samples))
            if frame.segment_end:
                self._utterances.popleft()
                self._record("end", True)
                yield AudioSegmentEnd()

    def _skip_queued_idle_video(self) -> None:
        """Speech starts: drop the idle frames still waiting in the AVSynchronizer's video queue.

        Audio goes straight to the audio source (empty during silence: it plays at once) while video
        waits behind up to 100 ms of queued idle frames, so without this the first syllable is heard
        ~50-100 ms before the mouth opens (measured with bench/livekit_worker.py). Skipping a couple of
        idle frames is invisible. The queue is the synchronizer's private attribute (livekit is pinned
        in the `livekit` extra); if it is renamed this logs once and does nothing."""
        queue = getattr(self.av_sync, "_video_queue", None) if self.av_sync is not None else None
        if not isinstance(queue, asyncio.Queue):
            if self.av_sync is not None and not self._warned_private:
                self._warned_private = True
                log.warning("AVSynchronizer has no _video_queue any more: speech onsets may show the "
                            "mouth up to 100 ms after the sound")
            return
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            queue.task_done()

    def _record(self, kind: str, speech: bool) -> None:
        if self.trace is not None:
            self.trace.append((kind, speech))


def _video_frame(image: np.ndarray) -> rtc.VideoFrame:
    h, w = image.shape[:2]
    buf = bytearray(h * w * 4)   # filled in place and handed over as is: no second copy per frame
    rgba = np.frombuffer(buf, np.uint8).reshape(h, w, 4)
    rgba[..., :3] = image
    rgba[..., 3] = 255
    return rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, buf)


def _remix(frame: rtc.AudioFrame, channels: int) -> rtc.AudioFrame:
    x = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels).astype(np.int32)
    mono = x.mean(axis=1, keepdims=True)
    y = np.repeat(mono, channels, axis=1).astype(np.int16)
    return rtc.AudioFrame(y.tobytes(), frame.sample_rate, channels, len(y))
