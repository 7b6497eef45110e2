"""StreamSession: one avatar's live timeline. The asyncio side (push audio, read frames, clear, close)
and the engine's planner/stage threads meet here, under one short lock.

Timeline: one continuous run of frames at the backend's fps. Pushed audio is placed on it in order;
when none is pending, idle frames fill it, paced by the clock (never more than the idle lead ahead).
Each frame k has a due time D(k) = max(D(k-1) + 1/fps, time its audio and look-ahead were complete):
the earliest moment a real-time consumer can need it. A segment whose first frame is more than
max_delay_ms past due when it is scheduled is held (previous image repeated, no backend call) so
latency stays bounded when generation falls behind; frames ready more than late_ms after due are late.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from typing import Any, AsyncIterator

import numpy as np

from emo_stream.backend import SegmentJob
from emo_stream.errors import EmoStreamError
from emo_stream.streaming.ingest import AudioInbox, EndOfSpeech, PcmConverter
from emo_stream.streaming.pacing import DuePacer
from emo_stream.streaming.stats import SessionStats
from emo_stream.streaming.types import AvatarHandle, Job, OutputFrame, SessionHost
from emo_stream.streaming.vad import VoiceActivity
from emo_stream.streaming.window import AudioWindow
from emo_stream.timeline import SAMPLE_RATE

log = logging.getLogger(__name__)

__all__ = ["StreamSession", "Job"]


class StreamSession:
    """Created by StreamingEngine.open_session(); see docs/streaming.md. Its asyncio side belongs to
    the event loop it was opened from (`loop`); each session may live on a different loop."""

    def __init__(self, host: SessionHost, avatar: AvatarHandle, state: Any, seed: int,
                 loop: asyncio.AbstractEventLoop, vad_model=None) -> None:
        cfg = host.config
        self.id = uuid.uuid4().hex[:12]
        self.avatar = avatar
        self.seed = seed
        self.state = state
        self._host = host
        self._cfg = cfg
        self._clock = host.clock
        self._loop = loop
        self.fps = host.fps
        self._spf = SAMPLE_RATE // host.fps
        self._size = host.frame_size
        self._lookahead_frames = host.audio_context.lookahead_frames
        self._lock = threading.Lock()
        # asyncio side
        self._converter = PcmConverter()
        self._frames_event = asyncio.Event()
        self._space_event = asyncio.Event()
        self._ts_origin: float | None = None   # sender timestamp of pushed sample 0 (gap filling)
        self._pushed = 0                       # samples pushed since the origin
        # shared, under _lock
        self._inbox = AudioInbox(int(cfg.input_seconds * SAMPLE_RATE))
        self._out: deque[OutputFrame] = deque()
        self._epoch = 0
        self._inflight_jobs = 0
        self._inflight_frames = 0
        self._next_index = 0                  # next timeline index to plan
        self._consumed_next = 0               # next index the consumer will read
        self._opened = self._clock.now()
        self._pacer = DuePacer(self.fps, self._opened, lead_frames=cfg.lead_frames,
                               max_delay_ms=cfg.max_delay_ms, late_ms=cfg.late_ms)
        self._reset_pending = False
        self._last_push = self._opened
        self._last_speech_index = -1
        self._mark_end_index: int | None = None
        self._last_image: np.ndarray | None = None        # last generated
        self._last_read_image: np.ndarray | None = None   # last handed to the consumer
        self._closed = False
        self._error: BaseException | None = None
        self._stats = SessionStats(self.fps, cfg.latency_window)
        # planner thread only
        self._window = AudioWindow(self._spf, host.audio_context)
        self._vad = VoiceActivity(vad_model, cfg.vad_threshold, cfg.energy_threshold_db,
                                  int(cfg.vad_hangover_ms * SAMPLE_RATE / 1000))

    # ------------------------------------------------------------------ asyncio side (event loop thread)

    async def push_audio(self, pcm, sample_rate: int = SAMPLE_RATE, channels: int = 1,
                         timestamp: float | None = None) -> None:
        """Queue interleaved PCM (int16, float, or PCM16 bytes; any rate and channel count).
        Awaits while the session's input queue is full (backpressure). `timestamp`: the sender's time
        of the chunk's first sample in seconds; a jump forward (lost packets) is filled with silence."""
        self._check_open()
        x = self._converter.convert(pcm, sample_rate, channels)
        if timestamp is not None:
            x = self._fill_gap(x, float(timestamp))
        self._pushed += len(x)
        while len(x):
            self._space_event.clear()
            with self._lock:
                if self._closed:
                    raise EmoStreamError("the session is closed")
                space = self._inbox.space()
                if space:
                    now = self._clock.now()
                    self._inbox.put(x[:space], now)
                    self._last_push = now
                    x = x[space:]
            if space:
                self._host.wake()
            if len(x):
                await self._space_event.wait()

    def _fill_gap(self, x: np.ndarray, timestamp: float) -> np.ndarray:
        if self._ts_origin is None:
            self._ts_origin = timestamp
            self._pushed = 0
            return x
        gap = timestamp - (self._ts_origin + self._pushed / SAMPLE_RATE)
        if gap * 1000 > self._cfg.gap_fill_ms:
            fill = int(min(gap, self._cfg.max_gap_s) * SAMPLE_RATE)
            log.debug("session %s: %.0f ms timestamp gap filled with silence", self.id, fill / 16)
            if gap > self._cfg.max_gap_s:   # a long pause: restart the sender clock instead
                self._ts_origin, self._pushed = timestamp - fill / SAMPLE_RATE, 0
            return np.concatenate([np.zeros(fill, np.float32), x])
        if gap < -self._cfg.max_gap_s:      # the sender's clock went back: follow it
            self._ts_origin, self._pushed = timestamp, 0
        return x

    def end_of_speech(self) -> None:
        """The utterance is complete: its tail is generated (zero-padded to a whole frame and the
        look-ahead) and its last frame carries segment_end."""
        if self._closed:
            return
        tail = self._converter.flush()
        with self._lock:
            now = self._clock.now()
            self._inbox.put(tail, now)   # a few ms at most: allowed past the bound
            self._inbox.put_end(EndOfSpeech(now))
            self._last_push = now
        self._ts_origin = None
        self._host.wake()

    def clear(self) -> None:
        """Interrupt: drop queued audio and undelivered frames; the timeline continues with idle frames
        from the next index the consumer reads."""
        if self._closed:
            return
        self._converter.reset()
        self._ts_origin = None
        with self._lock:
            self._stats.dropped_input_s += self._inbox.clear() / SAMPLE_RATE
            self._stats.discarded_frames += len(self._out)
            self._out.clear()
            self._epoch += 1
            self._inflight_jobs = self._inflight_frames = 0
            now = self._clock.now()
            # bridge to the backend's first idle segment: the picture the consumer last got, held, so
            # idle frames are there at once whatever the backend is still busy with
            self._next_index = self._consumed_next
            self._pacer.restart(now)
            if self._last_read_image is not None:
                for _ in range(self._cfg.clear_hold_frames):
                    i = self._next_index
                    self._out.append(OutputFrame(index=i, pts=i / self.fps, image=self._last_read_image,
                                                 audio=np.zeros(self._spf, np.float32), speech=False))
                    self._stats.record(now, False, False, False, False, None)
                    self._next_index += 1
                    self._pacer.skip()
            self._reset_pending = True
            self._mark_end_index = None
            self._last_speech_index = self._consumed_next - 1
        self._notify(self._frames_event)
        self._space_event.set()
        self._host.wake()

    async def next_frame(self) -> OutputFrame | None:
        """The next frame of the timeline (waits for it); None once the session is closed."""
        while True:
            self._frames_event.clear()
            with self._lock:
                if self._out:
                    frame = self._out.popleft()
                    self._consumed_next = frame.index + 1
                    self._last_read_image = frame.image
                    break
                if self._error is not None:
                    raise self._error
                if self._closed:
                    return None
            await self._frames_event.wait()
        self._host.wake()   # output capacity freed
        return frame

    async def frames(self) -> AsyncIterator[OutputFrame]:
        """Frames in order, forever, until close()."""
        while True:
            frame = await self.next_frame()
            if frame is None:
                return
            yield frame

    def stats(self) -> dict:
        with self._lock:
            snap = self._stats.snapshot()
            queued = self._inbox.queued + (0 if self._reset_pending else self._window.buffered_samples())
            speaking = queued > 0 or any(f.speech for f in self._out) or self._next_index - 1 <= \
                self._last_speech_index
            snap.update({
                "input_queue_s": round(queued / SAMPLE_RATE, 3),
                "output_queue_frames": len(self._out),
                "inflight_frames": self._inflight_frames,
                "next_index": self._consumed_next,
                "state": "closed" if self._closed else ("speech" if speaking else "idle"),
                "vad": "silero" if self._vad.uses_silero else "energy",
            })
        return snap

    @property
    def input_backlog_s(self) -> float:
        """Seconds of pushed audio not yet turned into frames (the input queue and the window)."""
        with self._lock:
            queued = self._inbox.queued + (0 if self._reset_pending else self._window.buffered_samples())
        return queued / SAMPLE_RATE

    @property
    def output_queue_frames(self) -> int:
        """Frames generated and waiting to be read."""
        with self._lock:
            return len(self._out)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Idempotent: frees the slot now; frames() ends; work in flight is discarded."""
        self._shutdown()
        self._host.release(self)

    def _shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.clear()
            self._out.clear()
            self._epoch += 1
        self._notify(self._frames_event)
        self._notify(self._space_event)

    def _check_open(self) -> None:
        if self._closed:
            raise EmoStreamError("the session is closed")
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ engine side (worker threads)

    def _notify(self, event: asyncio.Event) -> None:
        try:
            self._loop.call_soon_threadsafe(event.set)
        except RuntimeError:   # the loop is closed: nobody is waiting any more
            pass

    def job_is_stale(self, job: Job) -> bool:
        # a failed session's queued jobs are dropped too: no backend work for a timeline that has ended
        return self._closed or self._error is not None or job.epoch != self._epoch

    def plan(self, now: float, max_inflight: int) -> list[Job]:
        """Planner thread: move pushed audio into the window (VAD runs outside the lock) and cut the
        segments that are ready; or idle segments when no audio is pending."""
        cfg, spf = self._cfg, self._spf
        with self._lock:
            if self._closed or self._error is not None:
                return []
            reset, self._reset_pending = self._reset_pending, False
            epoch = self._epoch
        if reset:
            self._window.reset()
            self._vad.reset(self._window.pos)
        want = (cfg.segment_frames + self._lookahead_frames + 1) * spf - self._window.buffered_samples()
        with self._lock:
            if epoch != self._epoch:
                return []
            items = self._inbox.take(max(0, want))
        if items:
            self._notify(self._space_event)
        end_marks: list[EndOfSpeech] = []
        for item in items:
            if isinstance(item, EndOfSpeech):
                if not self._window.close_utterance(item.time, item.explicit):
                    end_marks.append(item)
                self._vad.feed(np.zeros(self._window.end - self._vad.fed, np.float32))
            else:
                self._window.append(item[0], item[1])
                self._vad.feed(item[0])

        jobs: list[Job] = []
        with self._lock:
            if epoch != self._epoch:
                return []   # cleared meanwhile: the next pass resets the window
            if end_marks and self._last_speech_index >= self._consumed_next:
                self._mark_utterance_end(self._last_speech_index)
            while self._inflight_jobs < max_inflight:
                capacity = cfg.output_frames - len(self._out) - self._inflight_frames
                ready = self._window.frames_ready()
                if ready >= cfg.segment_frames or (ready > 0 and self._window.pending_flush()):
                    n = min(cfg.segment_frames, ready)
                    if capacity < n:
                        self._pacer.block()
                        break
                    jobs.append(self._speech_job(now, n, epoch))
                elif self._window.buffered_samples() or self._inbox.pending():
                    # speech under way but incomplete: wait for audio, unless the sender has stalled
                    if (now - self._last_push > cfg.stall_flush_s and not self._inbox.pending()
                            and self._window.buffered_samples()):
                        log.debug("session %s: input stalled, flushing %d samples", self.id,
                                  self._window.buffered_samples())
                        self._window.close_utterance(now, explicit=False)
                        self._vad.feed(np.zeros(self._window.end - self._vad.fed, np.float32))
                        continue
                    break
                else:
                    n = cfg.segment_frames
                    if capacity < n:
                        self._pacer.block()
                        break
                    due = self._pacer.idle(now, n)
                    if due is None:
                        break
                    jobs.append(self._add_job(Job(self, epoch, self._next_index, n, due, speech=False)))
            self._vad.forget_before(self._window.pos)
        return jobs

    def _speech_job(self, now: float, n: int, epoch: int) -> Job:
        cut = self._window.cut(n)
        due = self._pacer.speech(now, cut.complete[:n])
        hold = self._pacer.behind(now, float(due[0]))
        lo = cut.first_frame * self._spf
        voiced = bool(self._vad.voiced(lo, lo + (n + self._lookahead_frames) * self._spf)) and not hold
        job = Job(self, epoch, self._next_index, n, due, speech=True, voiced=voiced, hold=hold, cut=cut,
                  segment_end=cut.end_of_speech)
        if hold:
            log.debug("session %s: %.0f ms behind, holding frames %d-%d", self.id, (now - due[0]) * 1000,
                      job.first_index, job.first_index + n - 1)
        self._add_job(job)
        self._last_speech_index = job.first_index + n - 1
        return job

    def _add_job(self, job: Job) -> Job:
        self._next_index += job.num_frames
        self._inflight_jobs += 1
        self._inflight_frames += job.num_frames
        job.segment = SegmentJob(avatar=self.avatar.avatar, state=self.state, features=None,
                                 num_frames=job.num_frames, speech=job.voiced)
        return job

    def _mark_utterance_end(self, index: int) -> None:
        """end_of_speech arrived after the utterance's frames were cut: flag its last frame."""
        for i, f in enumerate(self._out):
            if f.index == index:
                self._out[i] = OutputFrame(f.index, f.pts, f.image, f.audio, f.speech, True, f.voiced,
                                           f.dropped)
                return
        self._mark_end_index = index

    def deliver(self, job: Job, images: np.ndarray | None) -> None:
        """Stage thread: frames of a finished job enter the output queue (or are discarded if stale)."""
        now = self._clock.now()
        spf, n = self._spf, job.num_frames
        with self._lock:
            if job.epoch != self._epoch or self._closed or self._error is not None:
                self._stats.discarded_frames += n
                return
            self._inflight_jobs -= 1
            self._inflight_frames -= n
            size = self._size
            for i in range(n):
                index = job.first_index + i
                if job.hold or images is None:
                    image = self._last_image if self._last_image is not None else np.zeros((size, size, 3),
                                                                                          np.uint8)
                else:
                    image = np.ascontiguousarray(images[i])
                    self._last_image = image
                audio = job.cut.audio[i * spf:(i + 1) * spf] if job.speech else np.zeros(spf, np.float32)
                end = (job.segment_end and i == n - 1) or index == self._mark_end_index
                self._out.append(OutputFrame(index=index, pts=index / self.fps, image=image, audio=audio,
                                             speech=job.speech, segment_end=end, voiced=job.voiced,
                                             dropped=job.hold))
                latency = now - float(job.cut.complete[i]) if job.speech else None
                late = self._pacer.late(now, float(job.due[i]))
                self._stats.record(now, job.speech, job.voiced, job.hold, late, latency)
            if job.speech and not job.hold:
                self._stats.record_segment(now - float(job.cut.complete[-1]))
        self._notify(self._frames_event)
        self._host.wake()   # a pipeline slot is free: the next segment can be planned now

    def discard(self, job: Job) -> None:
        """A stale job leaves the pipeline without work."""
        self.deliver(job, None)

    def fail(self, exc: BaseException) -> None:
        """A backend error: the consumer gets it from frames(); other sessions go on."""
        if not isinstance(exc, EmoStreamError):
            exc = EmoStreamError(f"generation failed: {exc.__class__.__name__}: {exc}")
        with self._lock:
            if self._error is None:
                self._error = exc
        self._notify(self._frames_event)
        self._notify(self._space_event)
