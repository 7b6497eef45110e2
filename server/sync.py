"""A/V sync: each generated frame is released together with exactly the audio it covers, on ONE clock.

The engine yields frames k = 0, 1, 2, ... whose `audio` is the 16 kHz audio frame k covers. The
Playout pulls them, upsamples the audio to 48 kHz (WebRTC/Opus rate) and releases

    video frame k        at  t0 + k / fps                (pts k * 90000 / fps, 90 kHz clock)
    audio chunk n (20 ms) at  t0 + n * 960 / 48000        (pts n * 960, 48 kHz clock)

to every subscriber. Release times are computed from integers and one anchor t0, never
accumulated, so there is no drift however long a session runs. If the engine delivers late (a
frame is not ready until after its release time plus a tolerance), the anchor moves forward for
BOTH tracks at once: the stream stalls, it never desynchronises. The latency a stall added is
won back later by leaving out idle (silent) frames, one at a time, from both tracks together. aiortc stamps RTCP sender
reports with the wall time a packet is sent, so releasing both tracks on one clock is what keeps
the browser's lip sync.

Subscribers (WebRTC tracks of the talk page and any number of viewers, WebSocket frame relays,
the virtual camera) each get small bounded queues that drop their oldest entries: a slow viewer
loses frames, it never grows memory or slows the others (aiortc #1192, LiveTalking #153).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, AsyncIterator, Callable, Generic, Protocol, TypeVar

import numpy as np
from scipy.signal import firwin, upfirdn

from emo_stream.pcm import float_to_pcm16
from emo_stream.timeline import SAMPLE_RATE

from server import protocol

log = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90000
AUDIO_RATE = 48000
AUDIO_CHUNK = 960  # 20 ms at 48 kHz: one Opus packet
ENGINE_RATE = SAMPLE_RATE   # what the engine emits (emo_stream.timeline)

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    """The process's monotonic clock; the same object is handed to the engine (it only uses now())."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Upsampler:
    """16 kHz -> 48 kHz float -> int16, stateful so chunk edges are seamless; exactly 3 samples out per sample in.

    A 3x zero-stuffing polyphase FIR (windowed sinc, cut at 7.6 kHz); its constant group delay is
    0.6 ms, far inside one video frame.
    """

    def __init__(self, factor: int = 3, taps: int = 61):
        self.factor = factor
        self._h = (firwin(taps, 7600, fs=ENGINE_RATE * factor) * factor).astype(np.float64)
        # input samples the filter still reaches back to: carried between calls (the filter state)
        self._history = np.zeros(-(-(taps - 1) // factor))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64).reshape(-1)
        n_hist = len(self._history)
        padded = np.concatenate([self._history, x])
        y = upfirdn(self._h, padded, up=self.factor)[n_hist * self.factor:(n_hist + len(x)) * self.factor]
        self._history = padded[len(padded) - n_hist:]
        return float_to_pcm16(y)


@dataclass
class PlayoutFrame:
    """One released video frame with the audio it covers (both at the session's playout position)."""

    seq: int                 # position on the playout timeline (0 = first frame released)
    index: int               # the engine's frame index
    pts: float               # seconds on the playout timeline: seq / fps
    video_pts: int           # 90 kHz
    image: np.ndarray        # (H, W, 3) uint8 RGB
    audio: np.ndarray        # float32 16 kHz mono: exactly the engine's audio for this frame
    speech: bool
    segment_end: bool
    due: float = 0.0         # when the Playout released it (its clock): what WebRTC's sender reports map pts to
    _av_frame: Any = field(default=None, repr=False)

    def video_frame(self):
        """The frame as a PyAV VideoFrame (yuv420p, 90 kHz pts); converted once, shared by all viewers."""
        if self._av_frame is None:
            import av

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(self.image), format="rgb24").reformat(format="yuv420p")
            frame.pts = self.video_pts
            frame.time_base = Fraction(1, VIDEO_CLOCK_RATE)
            self._av_frame = frame
        return self._av_frame


@dataclass
class AudioChunk:
    """20 ms of 48 kHz int16 mono audio at its pts (in 48 kHz samples since the first frame)."""

    pts: int
    samples: np.ndarray
    due: float = 0.0         # when the Playout released it (its clock)

    def audio_frame(self):
        import av

        frame = av.AudioFrame.from_ndarray(self.samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self.pts
        frame.time_base = Fraction(1, AUDIO_RATE)
        return frame


class QueueClosed(Exception):
    """The subscription (or the whole playout) ended."""


class DropQueue(Generic[T]):
    """Bounded single-consumer queue that drops its OLDEST item when full (live media: newest wins)."""

    def __init__(self, maxlen: int):
        self._items: collections.deque[T] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        if self._closed:
            return
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> T:
        while not self._items:
            if self._closed:
                raise QueueClosed()
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def clear(self) -> None:
        self._items.clear()

    def keep_newest(self, n: int = 1) -> int:
        """Drop all but the newest n items (not counted as drops); returns how many went."""
        gone = max(0, len(self._items) - n)
        for _ in range(gone):
            self._items.popleft()
        return gone

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)


class Subscription:
    """What one consumer receives: frames (with their 16 kHz audio) and/or 20 ms audio chunks at 48 kHz."""

    def __init__(self, playout: "Playout", name: str, frames: int | None, audio: int | None,
                 frames_sink: Any = None):
        self.playout = playout
        self.name = name
        # frames_sink: any object with put/close/dropped (e.g. a WebSocket outbox that keeps frames and
        # events in one ordered stream); otherwise a DropQueue of `frames` entries
        self.frames: DropQueue[PlayoutFrame] | None = frames_sink or (DropQueue(frames) if frames else None)
        self.audio: DropQueue[AudioChunk] | None = DropQueue(audio) if audio else None

    @property
    def dropped(self) -> int:
        return (self.frames.dropped if self.frames else 0) + (self.audio.dropped if self.audio else 0)

    def close(self) -> None:
        for q in (self.frames, self.audio):
            if q is not None:
                q.close()
        self.playout.unsubscribe(self)


class Playout:
    """Paces one session's frames and audio on one clock and fans them out to subscribers.

    `on_event(dict)` receives playback events: {"type": "playback_started", "segment", "pts"} on the
    first released speech frame of an utterance, {"type": "playback_finished", "segment",
    "position", "interrupted"} when its last frame is released (or it is cleared).
    """

    def __init__(self, source: AsyncIterator[Any], fps: int, clock: Clock, *, late_tolerance_s: float = 0.12,
                 on_event: Callable[[dict], None] | None = None, live_input: bool = False,
                 queue_depth: Callable[[], int] | None = None, queue_cushion: int = 1):
        if VIDEO_CLOCK_RATE % fps or AUDIO_RATE % fps:
            raise ValueError(f"fps must divide {VIDEO_CLOCK_RATE} and {AUDIO_RATE}: got {fps}")
        self.fps = fps
        self.clock = clock
        self.late_tolerance_s = late_tolerance_s
        self.on_event = on_event
        self.live_input = live_input  # a live mic: unvoiced frames may be left out to win back latency
        # frames ready in the engine beyond the one being released: how much later than needed we play
        self._queue_depth = queue_depth
        self.queue_cushion = queue_cushion
        self._depths: collections.deque[int] = collections.deque(maxlen=fps)
        self._source = source
        self._subs: list[Subscription] = []
        self._upsample = Upsampler()
        self._pending = np.zeros(0, np.int16)  # 48 kHz samples released to nobody yet
        self._samples_per_frame48 = AUDIO_RATE // fps
        self.t0: float | None = None
        self._k0 = 0
        self._next_chunk = 0         # audio chunk counter n
        self._clear_pending = False
        self._in_segment = False
        self._segment = 0
        self._segment_frames = 0
        # stats
        self.frames_released = 0
        self.speech_frames = 0
        self.late_frames = 0
        self.reanchors = 0
        self.behind_s = 0.0          # how far stalls pushed the anchor back (won back on idle frames)
        self.skipped_frames = 0
        self.max_av_offset_s = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=2 * fps + 1)
        self.last_video_pts_s = 0.0
        self.last_audio_pts_s = 0.0
        self.finished = asyncio.Event()

    # -- subscribers ---------------------------------------------------------------------------
    def subscribe(self, name: str, frames: int | None = 3, audio: int | None = 10,
                  frames_sink: Any = None) -> Subscription:
        sub = Subscription(self, name, frames, audio, frames_sink)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    # -- control -------------------------------------------------------------------------------
    def clear(self) -> None:
        """Interrupt: the frame being waited on (fetched before the clear) is released silent, and
        an utterance in progress is reported finished with interrupted=True."""
        self._clear_pending = True
        for sub in self._subs:  # what viewers have not taken yet is stale speech: drop it
            for q in (sub.frames, sub.audio):
                if q is not None and hasattr(q, "clear"):
                    q.clear()
        if self._in_segment:
            self._finish_segment(interrupted=True)

    def due(self, seq: int) -> float:
        assert self.t0 is not None
        return self.t0 + seq / self.fps

    def chunk_due(self, n: int) -> float:
        assert self.t0 is not None
        return self.t0 + n * AUDIO_CHUNK / AUDIO_RATE

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Release frames until the source ends (session closed); cancellation-safe."""
        try:
            async for frame in self._source:
                await self._release(frame)
        finally:
            for sub in list(self._subs):
                sub.close()
            self.finished.set()

    async def _release(self, frame: Any) -> None:
        cleared = self._clear_pending
        self._clear_pending = False
        if self.t0 is None:
            self.t0 = self.clock.now()
            self._k0 = frame.index
        seq = frame.index - self._k0
        audio16 = np.asarray(frame.audio, np.float32).reshape(-1)
        speech = bool(frame.speech)
        if cleared and speech:
            audio16 = np.zeros_like(audio16)  # fetched before the clear: show it, don't play it
        audio48 = self._upsample(audio16)
        if self._should_leave_out(frame, speech):
            # Win latency back by leaving out one idle (or, with a live mic, unvoiced) frame. Both
            # tracks skip the same 40 ms of pts and the anchor moves back by as much, so the
            # receiver sees a short loss, not a shift between audio and video.
            self.t0 -= 1 / self.fps
            self.behind_s = max(0.0, self.behind_s - 1 / self.fps)
            self._depths = collections.deque((d - 1 for d in self._depths), maxlen=self._depths.maxlen)
            self._next_chunk += self._samples_per_frame48 // AUDIO_CHUNK
            self.skipped_frames += 1
            return
        self._pending = np.concatenate([self._pending, audio48])

        due = self.due(seq)
        await self.clock.sleep_until(due)
        if self._clear_pending:
            # cleared while this frame waited for its time: it was fetched before the clear, so it
            # is the one to release silent (else it would start a new utterance after the interrupt)
            self._clear_pending = False
            if speech and not cleared:
                cleared = True
                audio16 = np.zeros_like(audio16)
                self._pending[len(self._pending) - len(audio48):] = 0
        now = self.clock.now()
        if now - due > self.late_tolerance_s:
            # the engine was late: move the anchor for both tracks so they stay together
            self.late_frames += 1
            self.reanchors += 1
            self.t0 += now - due
            self.behind_s += now - due
            due = now

        out = PlayoutFrame(seq=seq, index=frame.index, pts=seq / self.fps,
                           video_pts=seq * (VIDEO_CLOCK_RATE // self.fps), image=frame.image, audio=audio16,
                           speech=speech and not cleared, segment_end=bool(getattr(frame, "segment_end", False)),
                           due=due)
        self._events_before(out)
        for sub in self._subs:
            if sub.frames is not None:
                sub.frames.put(out)
        self.last_video_pts_s = out.pts
        self.frames_released += 1
        self._recent.append(now)

        # audio chunks whose samples are complete and whose time falls inside this frame
        end_of_frame = (seq + 1) * self._samples_per_frame48
        while (self._next_chunk + 1) * AUDIO_CHUNK <= end_of_frame and len(self._pending) >= AUDIO_CHUNK:
            n = self._next_chunk
            await self.clock.sleep_until(self.chunk_due(n))
            chunk = AudioChunk(pts=n * AUDIO_CHUNK, samples=self._pending[:AUDIO_CHUNK], due=self.chunk_due(n))
            self._pending = self._pending[AUDIO_CHUNK:]
            self._next_chunk += 1
            for sub in self._subs:
                if sub.audio is not None:
                    sub.audio.put(chunk)
            self.last_audio_pts_s = chunk.pts / AUDIO_RATE
            self.max_av_offset_s = max(self.max_av_offset_s, abs(self.last_video_pts_s - self.last_audio_pts_s))
        self._events_after(out)

    def _should_leave_out(self, frame: Any, speech: bool) -> bool:
        """True when this frame may be skipped and the playout is later than it needs to be.

        "Later than needed": with the engine's queue depth known, frames have been waiting in it
        (its minimum over the last second stayed above the one-frame cushion); without it, a stall
        pushed the anchor back (behind_s). Only idle fill, or unvoiced frames of a live mic, go.
        """
        if self._queue_depth is not None:
            try:
                self._depths.append(int(self._queue_depth()))
            except Exception:
                self._queue_depth = None
        droppable = (not speech and not self._in_segment) or (
            self.live_input and not getattr(frame, "voiced", True) and not getattr(frame, "segment_end", False))
        if not droppable or len(self._pending) or self._samples_per_frame48 % AUDIO_CHUNK:
            return False
        if self._queue_depth is not None:
            return len(self._depths) == self._depths.maxlen and min(self._depths) > self.queue_cushion
        return self.behind_s >= 1 / self.fps - 1e-6

    def _events_before(self, f: PlayoutFrame) -> None:
        if f.speech:
            self.speech_frames += 1
            if not self._in_segment:
                self._in_segment = True
                self._segment += 1
                self._segment_frames = 0
                self._emit(protocol.playback_started(self._segment, f.pts))
            self._segment_frames += 1
        elif self._in_segment:
            # speech ran out without an explicit end (VAD-cut mic audio): the utterance is over
            self._finish_segment(interrupted=False)

    def _events_after(self, f: PlayoutFrame) -> None:
        if f.speech and f.segment_end and self._in_segment:
            self._finish_segment(interrupted=False)

    def _finish_segment(self, interrupted: bool) -> None:
        self._in_segment = False
        self._emit(protocol.playback_finished(self._segment, self._segment_frames / self.fps, interrupted))

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a listener's bug must not stop playback
                log.exception("playback event listener failed")

    # -- stats ---------------------------------------------------------------------------------
    @property
    def fps_measured(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1] - self._recent[0]
        return (len(self._recent) - 1) / span if span > 0 else 0.0

    def stats(self) -> dict:
        return {
            "frames": self.frames_released,
            "speech_frames": self.speech_frames,
            "playout_fps": round(self.fps_measured, 2),
            "late_frames": self.late_frames,
            "reanchors": self.reanchors,
            "behind_ms": round(1000 * self.behind_s, 1),
            "skipped_idle_frames": self.skipped_frames,
            "av_offset_ms": round(1000 * abs(self.last_video_pts_s - self.last_audio_pts_s), 1),
            "max_av_offset_ms": round(1000 * self.max_av_offset_s, 1),
            "subscribers": len(self._subs),
            "subscriber_drops": sum(s.dropped for s in self._subs),
        }
