"""StreamingEngine: drives one backend for many live sessions.

Stages, each a worker thread joined by bounded queues (so they overlap and throughput is set by the
slowest one):

    planner  -> [encode q] -> encoder -> [generate q] -> generator -> [decode q] -> decoder -> session queues
    (windowing, VAD,          (backend.encode_audio,     (backend.denoise, or       (backend.decode,
     idle pacing, policy)      or encode_audio_batch)     backend.generate)          frame conversion)

The encoder hands a backend that offers encode_audio_batch every segment queued at once (up to max_batch):
one audio-encoder call for all sessions. The decoder stage exists only when the backend offers
denoise()/decode(); otherwise the generator delivers. The generator batches the ready segments of
different sessions (same length, at most one per session, up to max_batch) into one backend call. Per
session at most `max_inflight` segments are in the pipeline, so a fast producer cannot crowd the others
out, and every queue stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from emo_stream.backend import AudioContext, Backend, capabilities
from emo_stream.errors import ImageInputError
from emo_stream.streaming.avatars import AvatarCache
from emo_stream.streaming.device import StageStreams
from emo_stream.streaming.faults import (BackendStalledError, EngineUnhealthyError, Health, is_device_error,
                                         is_out_of_memory)
from emo_stream.streaming.pacing import is_behind
from emo_stream.streaming.session import StreamSession
from emo_stream.streaming.types import AvatarHandle, Clock, EngineConfig, EngineFullError, Job, MonotonicClock
from emo_stream.timeline import samples_per_frame

log = logging.getLogger(__name__)

POLL_S = 0.005   # planner wake-up period: bounds idle pacing jitter and clear() reaction time
_ABANDONED = BackendStalledError("abandoned by the watchdog")   # an encode call whose sessions already failed
_NO_WINDOW = np.zeros(0, np.float32)


class _StageTimer:
    """Busy time and call count of one stage (for stats and the benchmark)."""

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0
        self.busy_s = 0.0

    def add(self, seconds: float, items: int = 1) -> None:
        self.calls += 1
        self.items += items
        self.busy_s += seconds

    def snapshot(self) -> dict:
        return {"calls": self.calls, "items": self.items, "busy_s": round(self.busy_s, 3),
                "mean_ms": round(1000 * self.busy_s / self.calls, 2) if self.calls else None}


class StreamingEngine:
    """See docs/streaming.md. Construct, `await start()`, prepare avatars, open sessions.

    The engine's work runs in its own threads; its asyncio methods may be called from any event loop
    (a session belongs to the loop it was opened from), so one engine serves sessions of several loops.
    It is the SessionHost its sessions see (config, clock, fps, frame_size, audio_context, wake, release).
    """

    def __init__(self, backend: Backend, config: EngineConfig | None = None, clock: Clock | None = None) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self.clock: Clock = clock or MonotonicClock()
        self.fps = int(backend.fps)
        samples_per_frame(self.fps)   # validates fps
        self.capabilities = capabilities(backend)
        self._split = self.capabilities.split
        self._batch_audio = self.capabilities.batch_audio
        self._max_inflight = 3 if self._split else 2
        depth = self.config.max_sessions * self._max_inflight + 1
        self._q_encode: queue.Queue[Job] = queue.Queue(maxsize=depth)
        self._q_generate: queue.Queue[Job] = queue.Queue(maxsize=depth)
        self._q_decode: queue.Queue[tuple[list[Job], Any]] = queue.Queue(maxsize=2)
        self._sessions: dict[str, StreamSession] = {}
        self._sessions_lock = threading.Lock()
        self._wake_event = threading.Event()
        # prepare_avatar and denoise/generate both run the backend's reference network (EMO keeps its
        # captured features in one store): never at the same time. encode_audio and decode use other
        # modules and overlap freely with them.
        # Backends that declare `concurrent_generate = True` (calls for different sessions may run at
        # once, e.g. the CPU preview animator) get several generator workers and no lock.
        concurrent = self.capabilities.concurrent_generate
        workers = self.config.generate_workers
        self._workers = workers if workers is not None else (min(2, os.cpu_count() or 1) if concurrent else 1)
        self._model_lock = contextlib.nullcontext() if concurrent else threading.Lock()
        self._gen_lock = threading.Lock()
        self._streams = StageStreams(self.capabilities.device, self.config.cuda_streams)
        self._gen_pending: list[Job] = []
        self._gen_busy: set[str] = set()
        self._running = False
        self._threads: list[threading.Thread] = []
        self._unfinished: list[threading.Thread] = []
        self._vad_model = None
        self.avatars = AvatarCache(self._prepare_locked, self.config.max_avatars,
                                   in_use=lambda: [s.avatar.id for s in list(self._sessions.values())])
        self._timers = {name: _StageTimer() for name in ("plan", "encode", "generate", "denoise", "decode")}
        self._batch_sizes: list[int] = []
        self._gen_stage = "denoise" if self._split else "generate"
        self.health = Health(self.config.unhealthy_after_failures)
        self._failed_all = False           # every session got the engine's own failure (device error / stall)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._running:
            return
        if self.config.vad and self._vad_model is None:
            try:
                from emo_stream.streaming.vad import load_silero

                self._vad_model = await asyncio.to_thread(load_silero)
            except Exception as exc:   # the engine still works, with the energy detector
                log.warning("silero-vad unavailable (%s): using the energy voice detector", exc)
        self._running = True
        stages = [("planner", self._planner), ("encoder", functools.partial(self._stage, "encoder", self._encode_pass))]
        stages += [(f"generator{i}", functools.partial(self._stage, "generator", self._generate_pass))
                   for i in range(self._workers)]
        if self._split:
            stages.append(("decoder", functools.partial(self._stage, "decoder", self._decode_pass)))
        stages.append(("watchdog", self._watchdog))
        for name, target in stages:
            t = threading.Thread(target=target, name=f"emo-stream-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("streaming engine started: backend %s, %d fps, segment %d frames, %s stages",
                 self.capabilities.name, self.fps,
                 self.config.segment_frames, len(stages))

    async def stop(self) -> None:
        """Close every session and stop the worker threads."""
        for session in list(self._sessions.values()):
            await session.close()
        self._running = False
        self._wake_event.set()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + self.config.stop_join_s
        await asyncio.to_thread(lambda: [t.join(timeout=max(0.0, deadline - time.monotonic())) for t in threads])
        self._unfinished = [t for t in threads if t.is_alive()]
        if self._unfinished:
            log.warning("engine stopped with %s still inside a backend call",
                        ", ".join(t.name for t in self._unfinished))

    @property
    def unfinished_threads(self) -> list[threading.Thread]:
        """Stage threads that stop() left running (inside a long backend call). The process must not end
        through interpreter shutdown while one of them runs torch code: C++ aborts it ("terminate called
        without an active exception", SIGABRT); see server.serve_command."""
        return [t for t in self._unfinished if t.is_alive()]

    async def __aenter__(self) -> "StreamingEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._running

    @property
    def sessions(self) -> int:
        """Number of open sessions."""
        return len(self._sessions)

    @property
    def frame_size(self) -> int:
        return int(self.backend.size)

    @property
    def audio_context(self) -> AudioContext:
        return self.backend.audio_context

    def wake(self) -> None:
        self._wake_event.set()

    # ------------------------------------------------------------------ avatars and sessions

    async def prepare_avatar(self, image: np.ndarray, owner: str | None = None) -> AvatarHandle:
        """Prepare a portrait once (backend.prepare_avatar in a worker thread); cached by content hash,
        so every session with the same photo shares its reference features (see AvatarCache). Backends
        with video_avatars also take a short video as (T, H, W, 3) frames. `owner` (a client) holds it."""
        if getattr(image, "ndim", 3) == 4 and not self.capabilities.video_avatars:
            raise ImageInputError(f"the {self.capabilities.name} backend animates a portrait photo, not a video")
        return await self.avatars.prepare(image, owner)

    def avatar(self, avatar_id: str) -> AvatarHandle:
        """A prepared avatar by its id; UnknownAvatarError (an ImageInputError) when it is not cached."""
        return self.avatars.get(avatar_id)

    def _prepare_locked(self, image: np.ndarray) -> Any:
        with self._model_lock:
            avatar = self.backend.prepare_avatar(image)
            self._streams.synchronize()   # its tensors are complete before any stage stream reads them
            return avatar

    def open_session(self, avatar: AvatarHandle, seed: int = 0,
                     loop: asyncio.AbstractEventLoop | None = None) -> StreamSession:
        """A new live session on a prepared avatar, bound to `loop` (default: the running loop, so call
        it from the coroutine that will push audio and read frames). Raises EngineFullError when
        max_sessions are open."""
        if not self._running:
            raise RuntimeError("the streaming engine is not started (await engine.start())")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("open_session needs an event loop: call it from a coroutine, or pass "
                                   "loop=") from None
        if not isinstance(avatar, AvatarHandle):
            raise TypeError("open_session needs an AvatarHandle from engine.prepare_avatar()")
        if not self.health.healthy:
            status = self.health.status()
            raise EngineUnhealthyError(f"the avatar engine is unavailable ({status['status']}: {status['reason']})")
        with self._sessions_lock:
            if len(self._sessions) >= self.config.max_sessions:
                raise EngineFullError(f"the server is busy: all {self.config.max_sessions} avatar sessions are "
                                      "in use, try again later")
            state = self.backend.new_state(avatar.avatar, seed)
            session = StreamSession(self, avatar, state, seed, loop, self._vad_model)
            self._sessions[session.id] = session
        self.wake()
        log.info("session %s opened (avatar %s, %d/%d)", session.id, avatar.id, len(self._sessions),
                 self.config.max_sessions)
        return session

    def release(self, session: StreamSession) -> None:
        """SessionHost: a closed session gives its slot back (called by StreamSession.close)."""
        with self._sessions_lock:
            if self._sessions.pop(session.id, None) is not None:
                log.info("session %s closed", session.id)
        self.wake()

    def stats(self) -> dict:
        """Engine-wide counters: stage busy times, batch sizes, queue depths."""
        sizes = self._batch_sizes[-1000:]
        return {
            "backend": self.capabilities.name,
            "sessions": self.sessions,
            "stages": {k: v.snapshot() for k, v in self._timers.items() if v.calls},
            "mean_batch": round(float(np.mean(sizes)), 2) if sizes else None,
            "health": self.health.status(),
            "queues": {"encode": self._q_encode.qsize(), "generate": self._q_generate.qsize(),
                       "decode": self._q_decode.qsize()},
        }

    # ------------------------------------------------------------------ stages (worker threads)

    def _put(self, q: queue.Queue, item) -> bool:
        """Blocking put that gives up when the engine stops."""
        while self._running:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while self._running:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _planner(self) -> None:
        turn = 0
        while self._running:
            try:
                turn = self._plan_round(turn)
            except Exception:   # a bug here must not stop every session's timeline
                log.exception("planner round failed")

    def _plan_round(self, turn: int) -> int:
        self._wake_event.wait(POLL_S)
        self._wake_event.clear()
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        if not sessions:
            return turn
        turn = (turn + 1) % len(sessions)   # round robin: nobody is always first in the queue
        t0 = time.perf_counter()
        planned = 0
        for session in sessions[turn:] + sessions[:turn]:
            try:
                jobs = session.plan(self.clock.now(), self._max_inflight)
            except Exception as exc:
                log.exception("session %s: planning failed", session.id)
                session.fail(exc)
                continue
            for job in jobs:
                if not self._put(self._q_encode, job):
                    return turn
            planned += len(jobs)
        if planned:
            self._timers["plan"].add(time.perf_counter() - t0, planned)
        return turn

    def _stage(self, name: str, one_pass: Callable[[], bool]) -> None:
        """A stage thread: `one_pass` until it returns False (the engine stopped). One pass per call, so its
        locals (jobs, and so their sessions) are gone while the stage waits for the next."""
        self._streams.enter_stage(name)
        while self._running and one_pass():
            pass

    def _encode_pass(self) -> bool:
        """Encode what is queued now (one encoder call when the backend batches audio); False once stopped."""
        job = self._get(self._q_encode)
        if job is None:
            return False
        jobs = [job]
        # what else is queued now goes into the same encoder call (backends with encode_audio_batch)
        while self._batch_audio and len(jobs) < self.config.max_batch:
            try:
                jobs.append(self._q_encode.get_nowait())
            except queue.Empty:
                break
        live = []
        for j in jobs:
            if j.stale():
                j.session.discard(j)
            else:
                live.append(j)
        work = [j for j in live if j.voiced and not j.hold]
        failed = set(work) - set(self._encode(work)) if work else set()
        for j in live:
            if j.cut is not None:   # the window is not needed past this stage (MuseTalk's: up to 30 s)
                j.cut.window = _NO_WINDOW
            if j not in failed:
                self._put(self._q_generate, j)
        return True

    def _encode(self, work: list[Job]) -> list[Job]:
        """Audio features of `work`: one encode_audio_batch call when the backend offers it (a batch that fails is
        retried job by job, so one session's failure stays its own), else encode_audio per job. Returns the jobs
        encoded; the sessions of the others have their error."""
        if len(work) > 1 and self._batch_audio:
            error = self._encode_call(work, batched=True)
            if error is None:
                return work
            if error is _ABANDONED:
                return []
            if self.health.device_error is None and not is_device_error(error):
                # job by job; a session that failed on an earlier job of this batch is not tried again (its
                # later segments would count as more failures in a row and could declare the device broken)
                return [j for j in work if not j.stale() and self._encode_one(j)]
            log.error("session(s) %s: audio encoding failed: %s: %s", ", ".join(j.session.id for j in work),
                      error.__class__.__name__, error)
            for j in work:
                j.session.fail(error)
            self._after_failure()
            return []
        return [j for j in work if self._encode_one(j)]

    def _encode_one(self, job: Job) -> bool:
        error = self._encode_call([job], batched=False)
        if error is None:
            return True
        if error is not _ABANDONED:
            log.error("session %s: audio encoding failed", job.session.id, exc_info=error)
            job.session.fail(error)
            self._after_failure()
        return False

    def _encode_call(self, jobs: list[Job], batched: bool) -> Exception | None:
        """One backend call for `jobs`; None when their features are set, else the error (or the watchdog's)."""
        t0 = time.perf_counter()
        call = self.health.begin("encode", [j.session for j in jobs])
        try:
            if batched:
                feats = self.backend.encode_audio_batch([(j.cut.window, j.cut.start, j.num_frames) for j in jobs])
            else:
                feats = [self.backend.encode_audio(j.cut.window, j.cut.start, j.num_frames) for j in jobs]
        except Exception as exc:
            # a batch's failure is retried job by job (_encode): those calls count, this one does not
            self.health.end(call, False, exc, in_a_row=not batched)
            if call.abandoned:   # the watchdog already failed these sessions: no retry
                self._after_failure()
                return _ABANDONED
            return exc
        self.health.end(call, True)
        if call.abandoned:     # the watchdog already failed these sessions
            return _ABANDONED
        event = self._streams.mark()
        for j, f in zip(jobs, feats):
            j.features = j.segment.features = f
            j.event = event
        self._timers["encode"].add(time.perf_counter() - t0, len(jobs))
        return None

    def _next_batch(self, pending: list[Job], busy: set[str]) -> tuple[list[Job], list[Job]]:
        """Pick jobs for one backend call: in queue order, one per session (none of a session another
        worker is generating for), same length, <= max_batch. Hold jobs ride along (no backend work) to
        keep each session's order. Returns (batch, rest)."""
        batch: list[Job] = []
        rest: list[Job] = []
        seen: set[str] = set(busy)
        length = None
        work = 0
        now = self.clock.now()
        for job in pending:
            sid = job.session.id
            if job.stale():
                job.session.discard(job)
                continue
            if sid in seen:
                rest.append(job)
                continue
            seen.add(sid)
            if not job.hold and is_behind(now, float(job.due[0]), self.config.max_delay_ms):
                # fell behind while queued: the fall-behind policy applies here too, so latency stays
                # bounded by max_delay plus the one backend call in progress
                job.hold, job.voiced = True, False
            if job.hold:
                batch.append(job)
                continue
            if work >= self.config.max_batch or (length is not None and job.num_frames != length):
                rest.append(job)
                continue
            length = job.num_frames
            work += 1
            batch.append(job)
        return batch, rest

    def _take_batch(self) -> list[Job] | None:
        """Generator workers share the queued jobs; a session is busy while one of them works on it, so
        its segments still go through the backend one after another, in order."""
        while self._running:
            with self._gen_lock:
                while True:   # everything queued now is a candidate for this batch
                    try:
                        self._gen_pending.append(self._q_generate.get_nowait())
                    except queue.Empty:
                        break
                batch, self._gen_pending = self._next_batch(self._gen_pending, self._gen_busy)
                if batch:
                    self._gen_busy.update(j.session.id for j in batch)
                    return batch
            try:   # wait for new work (or for a busy session to be released)
                job = self._q_generate.get(timeout=0.02)
            except queue.Empty:
                continue
            with self._gen_lock:
                self._gen_pending.append(job)
        return None

    def _generate_pass(self) -> bool:
        """Generate one batch of the queued jobs; False once stopped."""
        batch = self._take_batch()
        if batch is None:
            return False
        try:
            self._generate_batch(batch)
        except Exception as exc:   # keep the worker alive; the batch's sessions get the error
            log.exception("generator failed on a batch")
            for j in batch:
                j.session.fail(exc)
        finally:
            with self._gen_lock:
                self._gen_busy.difference_update(j.session.id for j in batch)
        return True

    def _generate_batch(self, batch: list[Job]) -> None:
        work = [j for j in batch if not j.hold]
        holds = [j for j in batch if j.hold]
        groups: list[tuple[list[Job], Any]] = []
        if work:
            self._batch_sizes.append(len(work))
            if len(self._batch_sizes) > 10000:
                del self._batch_sizes[:5000]
            t0 = time.perf_counter()
            self._streams.wait(j.event for j in work)
            groups = self._call_in_halves(work)
            self._timers[self._gen_stage].add(time.perf_counter() - t0, sum(len(g) for g, _ in groups))
        if self._split:
            event = self._streams.mark()
            if not groups:
                groups = [([], None)]
            for n, (jobs, latents) in enumerate(groups):
                for j in jobs:
                    j.event = event
                # hold jobs ride with the first group: each session has at most one job in a batch
                self._put(self._q_decode, ((holds if n == 0 else []) + jobs, (jobs, latents)))
        else:
            if holds:
                self._deliver(holds, [], None)
            for jobs, frames in groups:
                self._deliver(jobs, jobs, frames)

    def _call_in_halves(self, work: list[Job]) -> list[tuple[list[Job], Any]]:
        """backend.generate (or denoise) on `work`; a batch that fails is retried in halves, so one session's
        failure (out of memory, a bad input) ends that session alone. Returns (jobs, result) of the calls that
        worked; the sessions of the rest have their error."""
        work = [j for j in work if not j.stale()]   # a session may have failed since the batch was taken
        if not work:
            return []

        def call():
            with self._model_lock:
                segments = [j.segment for j in work]
                return self.backend.denoise(segments) if self._split else self.backend.generate(segments)

        watched = self._watched(self._gen_stage, work, call)
        if watched is None:
            return []
        result, error = watched
        if error is None:
            return [(work, result)]
        if len(work) == 1 or self.health.device_error is not None or is_device_error(error):
            expected = is_out_of_memory(error) or is_device_error(error)   # no traceback for the usual suspects
            log.error("backend %s failed for session(s) %s: %s: %s", self._gen_stage,
                      ", ".join(j.session.id for j in work), type(error).__name__, error, exc_info=not expected)
            for j in work:
                j.session.fail(error)
            self._after_failure()
            return []
        self.health.retried_calls += 1
        log.warning("backend %s failed on a batch of %d (%s: %s): retrying it in halves", self._gen_stage,
                    len(work), type(error).__name__, error)
        del error                 # its traceback holds the batch's tensors: free them before the retry
        half = len(work) // 2
        return self._call_in_halves(work[:half]) + self._call_in_halves(work[half:])

    def _after_failure(self) -> None:
        """Once the device is declared broken, every session hears it now (their next calls would fail anyway)."""
        if self.health.device_error is not None and not self._failed_all:
            self._fail_all(EngineUnhealthyError(f"the avatar engine's device failed: {self.health.device_error}"))

    def _fail_all(self, exc: BaseException) -> None:
        self._failed_all = True
        with self._sessions_lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.fail(exc)

    def _watchdog(self) -> None:
        """A backend call that never returns: its sessions get an error after call_timeout_s, the engine reports
        itself stalled, and when no generator worker is left every session gets the error."""
        timeout = float(self.config.call_timeout_s)
        period = min(0.5, timeout / 5)
        while self._running:
            time.sleep(period)
            try:
                for call in self.health.overdue(timeout):
                    exc = BackendStalledError(f"the backend's {call.stage} call did not return within {timeout:g} s "
                                              "(call_timeout_s): the device may be hung")
                    log.error("%s (sessions %s)", exc, ", ".join(s.id for s in call.sessions))
                    for session in call.sessions:
                        session.fail(exc)
                # a stage whose every thread is stuck stops the whole pipeline
                threads = {"encode": 1, self._gen_stage: self._workers, "decode": 1}
                stuck = {stage: self.health.busy_stages(stage)[1] for stage in threads}
                blocked = any(stuck[stage] >= n for stage, n in threads.items())
                if blocked and not self._failed_all:
                    self._fail_all(EngineUnhealthyError(
                        f"the avatar engine stalled: a backend call has not returned for over {timeout:g} s"))
                elif not any(stuck.values()) and self._failed_all and self.health.device_error is None:
                    self._failed_all = False   # the stuck call returned: new sessions work again
            except Exception:
                log.exception("watchdog round failed")

    def _decode_pass(self) -> bool:
        """Decode one denoised batch and deliver its frames (hold jobs too); False once stopped."""
        item = self._get(self._q_decode)
        if item is None:
            return False
        batch, (work, latents) = item
        holds = [j for j in batch if j.hold]
        groups: list[tuple[list[Job], Any]] = []
        if work:
            t0 = time.perf_counter()
            self._streams.wait([work[0].event])
            groups = self._decode_in_halves(work, latents)
            self._timers["decode"].add(time.perf_counter() - t0, sum(len(g) for g, _ in groups))
        if not groups:
            self._deliver(holds, [], None)
        for n, (jobs, frames) in enumerate(groups):
            self._deliver((holds if n == 0 else []) + jobs, jobs, frames)
        return True

    def _watched(self, stage: str, work: list[Job], fn: Callable[[], Any]) -> tuple[Any, Exception | None] | None:
        """fn(), a backend call for `work`'s sessions, under the watchdog: (result, None) or (None, its error);
        None when the watchdog gave up on the call (it gave these sessions their error: a late answer is
        dropped)."""
        call = self.health.begin(stage, [j.session for j in work])
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:
            error = exc
        self.health.end(call, error is None, error)
        return None if call.abandoned else (result, error)

    def _decode_in_halves(self, work: list[Job], latents: Any) -> list[tuple[list[Job], Any]]:
        """backend.decode on `work`; a batch that fails is retried in halves as the denoise batch is (the
        latents split per job: a list of them, or the backend's `select_latents`), so one session's failure
        ends that session alone. Returns (jobs, frames) of the calls that worked."""
        watched = self._watched("decode", work, lambda: self.backend.decode([j.segment for j in work], latents))
        if watched is None:
            return []
        frames, error = watched
        if error is None:
            return [(work, frames)]
        half = len(work) // 2
        parts = None
        if len(work) > 1 and self.health.device_error is None and not is_device_error(error):
            parts = (self._select_latents(latents, list(range(half))),
                     self._select_latents(latents, list(range(half, len(work)))))
        if parts is None or parts[0] is None or parts[1] is None:
            expected = is_out_of_memory(error) or is_device_error(error)   # no traceback for the usual suspects
            log.error("backend decode failed for session(s) %s: %s: %s", ", ".join(j.session.id for j in work),
                      type(error).__name__, error, exc_info=not expected)
            for j in work:
                j.session.fail(error)
            self._after_failure()
            return []
        self.health.retried_calls += 1
        log.warning("backend decode failed on a batch of %d (%s: %s): retrying it in halves", len(work),
                    type(error).__name__, error)
        del error, latents        # the traceback holds the batch's tensors: free them before the retry
        return self._decode_in_halves(work[:half], parts[0]) + self._decode_in_halves(work[half:], parts[1])

    def _select_latents(self, latents: Any, indices: list[int]) -> Any:
        """The latents of the jobs at `indices`, or None when this backend's latents cannot be split."""
        if self.capabilities.select_latents is not None:
            return self.capabilities.select_latents(latents, indices)
        if isinstance(latents, (list, tuple)):
            return [latents[i] for i in indices]
        return None

    def _deliver(self, batch: list[Job], work: list[Job], frames) -> None:
        """Hand each job's frames to its session; a backend answer of the wrong shape fails that session
        (clear message) instead of the stage thread."""
        images: dict[int, Any] = {}
        if work and frames is not None:
            if len(frames) != len(work):
                exc = RuntimeError(f"backend returned {len(frames)} results for {len(work)} jobs")
                for j in work:
                    j.session.fail(exc)
                batch = [j for j in batch if j.hold]
            else:
                images = {id(j): f for j, f in zip(work, frames)}
        size = int(self.backend.size)
        for job in batch:
            try:
                out = None
                if not job.hold:
                    out = images.get(id(job))
                    if out is not None:
                        out = np.asarray(out)
                        if out.shape != (job.num_frames, size, size, 3) or out.dtype != np.uint8:
                            raise RuntimeError(f"backend frames have shape {out.shape} {out.dtype}, expected "
                                               f"({job.num_frames}, {size}, {size}, 3) uint8")
                job.session.deliver(job, out)
            except Exception as exc:
                log.exception("session %s: delivering frames failed", job.session.id)
                job.session.fail(exc)
