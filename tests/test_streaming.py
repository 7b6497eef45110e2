"""Streaming engine behaviour with a trivial deterministic backend (no model): timeline, audio
round trip, clear, idle pacing, backpressure, batching, session limits, fall-behind policy."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from emo_stream.backend import AudioContext, SegmentJob
from emo_stream.errors import EmoStreamError
from emo_stream.streaming import EngineConfig, EngineFullError, OutputFrame, StreamingEngine
from emo_stream.streaming.ingest import PcmConverter
from tests.conftest import read_until

FPS, SPF, SIZE = 25, 640, 8
pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class TickBackend:
    """Frames whose pixels encode the state's frame counter (pixel [0,0,0:2]), whether the job was
    speech ([1,0,0]) and the features' audio energy ([2,0,0]); features are the raw frame audio."""

    name = "tick"
    fps = FPS
    size = SIZE
    audio_context = AudioContext(left_samples=2 * SPF, lookahead_frames=2)

    def __init__(self, delay: float = 0.0, on_generate=None) -> None:
        self.delay = delay
        self.on_generate = on_generate
        self.calls: list[int] = []
        self.encoded = 0
        self.prepared = 0
        self.lock = threading.Lock()

    def prepare_avatar(self, image):
        with self.lock:
            self.prepared += 1
        return {"mean": float(image.mean())}

    def new_state(self, avatar, seed=0):
        return {"n": 0, "seed": seed}

    def encode_audio(self, audio, start, num_frames):
        assert len(audio) == start + (num_frames + 2) * SPF, "window must include the look-ahead"
        assert start <= 2 * SPF
        self.encoded += 1
        return audio[start:start + num_frames * SPF].reshape(num_frames, SPF).copy()

    def generate(self, jobs: list[SegmentJob]):
        self.calls.append(len(jobs))
        if self.delay:
            time.sleep(self.delay)
        if self.on_generate:
            self.on_generate(jobs)
        out = []
        for job in jobs:
            frames = np.zeros((job.num_frames, SIZE, SIZE, 3), np.uint8)
            for i in range(job.num_frames):
                k = job.state["n"] + i
                frames[i, 0, 0, :2] = (k % 256, k // 256)
                frames[i, 1, 0, 0] = 255 if job.speech else 0
                if job.features is not None:
                    frames[i, 2, 0, 0] = min(255, int(np.sqrt(np.mean(job.features[i] ** 2)) * 1000))
            job.state["n"] += job.num_frames
            out.append(frames)
        return out


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def padded(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.zeros((-len(x)) % SPF, np.float32)])



async def drain(session, quiet: float = 0.3) -> list[OutputFrame]:
    """Frames until none arrives for `quiet` seconds."""
    frames = []
    while True:
        try:
            f = await asyncio.wait_for(session.next_frame(), quiet)
        except asyncio.TimeoutError:
            return frames
        frames.append(f)


@pytest.fixture
def image():
    return np.full((32, 32, 3), 128, np.uint8)


async def open_engine(backend, clock=None, **cfg):
    cfg.setdefault("vad", False)
    engine = StreamingEngine(backend, EngineConfig(**cfg), clock=clock or FakeClock())
    await engine.start()
    return engine


async def open_session(image, backend, clock=None, **cfg):
    """open_engine, and one session of `image`."""
    engine = await open_engine(backend, clock, **cfg)
    return engine, engine.open_session(await engine.prepare_avatar(image))


def check_timeline(frames: list[OutputFrame], first: int = 0) -> None:
    assert [f.index for f in frames] == list(range(first, first + len(frames)))
    for f in frames:
        assert f.pts == f.index / FPS
        assert f.audio.dtype == np.float32 and f.audio.shape == (SPF,)
        assert f.image.shape == (SIZE, SIZE, 3) and f.image.dtype == np.uint8
        if not f.speech:
            assert not f.audio.any()


def tick_counter(frame: OutputFrame) -> int:
    """TickBackend's state counter, drawn into the frame's pixels."""
    return int(frame.image[0, 0, 0]) + 256 * int(frame.image[0, 0, 1])


async def sessions_say(engine, avatar, sessions: int, audio: np.ndarray) -> list[list[OutputFrame]]:
    """`sessions` sessions of `avatar` (seeds 0, 1, ...) each say `audio` once, all at the same time: each
    session's frames up to the end of that utterance."""
    opened = [engine.open_session(avatar, seed=i) for i in range(sessions)]
    for s in opened:
        await s.push_audio(audio)
        s.end_of_speech()
    return await asyncio.gather(*(read_until(s, lambda f: f.segment_end) for s in opened))


def check_own_frames_in_order(frames: list[OutputFrame], audio: np.ndarray) -> None:
    """One session's utterance: its timeline, exactly its audio, and the backend's frames of this session's
    state in order (the counter pixel is the timeline index: no other session's segment got in)."""
    check_timeline(frames)
    assert np.array_equal(np.concatenate([f.audio for f in frames if f.speech]), padded(audio))
    for f in frames:
        assert tick_counter(f) == f.index


async def test_audio_round_trip_any_format(image):
    """Speech frames carry exactly the pushed audio (resampled), across odd chunks, rates, channels,
    segment boundaries and end_of_speech; pts follow the audio clock; frames are generated in order."""
    backend = TickBackend()
    engine, session = await open_session(image, backend, segment_frames=5)
    rng = np.random.default_rng(1)
    # utterance 1: 48 kHz stereo int16 in odd chunk sizes; utterance 2: 22.05 kHz mono float; 3: 16 kHz
    u1 = tone(1.37, 48000)
    stereo = np.stack([u1, u1 * 0.5], axis=1).reshape(-1)
    pcm1 = (stereo * 32767).astype(np.int16)
    u2 = tone(0.61, 22050, 330)
    u3 = tone(0.5, 16000, 150)
    expected = []
    conv = PcmConverter()
    expected.append(padded(np.concatenate([conv.convert(pcm1, 48000, 2), conv.flush()])))
    expected.append(padded(np.concatenate([conv.convert(u2, 22050, 1), conv.flush()])))
    expected.append(padded(u3))

    async def produce():
        i = 0
        while i < len(pcm1):
            n = int(rng.integers(1, 3001))
            await session.push_audio(pcm1[i:i + n], sample_rate=48000, channels=2)
            i += n
        session.end_of_speech()
        for j in range(0, len(u2), 977):
            await session.push_audio(u2[j:j + 977], sample_rate=22050)
        session.end_of_speech()
        await session.push_audio(u3)
        session.end_of_speech()

    producer = asyncio.create_task(produce())
    ends = 0
    frames = []
    async for f in session.frames():
        frames.append(f)
        ends += f.segment_end
        if ends == 3:
            break
    await producer
    check_timeline(frames)
    speech = [f for f in frames if f.speech]
    got = np.concatenate([f.audio for f in speech])
    np.testing.assert_array_equal(got, np.concatenate(expected))
    # utterance ends land exactly on the last frame of each utterance
    ends_at = [i for i, f in enumerate(speech) if f.segment_end]
    assert ends_at == list(np.cumsum([len(e) // SPF for e in expected]) - 1)
    # frames are the backend's frames in order (the counter pixel is the timeline index)
    for f in frames:
        assert tick_counter(f) == f.index
    # the features the backend saw for a frame are that frame's audio (energy pixel)
    for f in speech:
        assert int(f.image[2, 0, 0]) == min(255, int(np.sqrt(np.mean(f.audio ** 2)) * 1000))
    st = session.stats()
    assert st["speech_frames"] == len(speech) and st["dropped_frames"] == 0
    await engine.stop()


async def test_idle_frames_paced_by_clock(image):
    clock = FakeClock()
    engine, session = await open_session(image, TickBackend(), clock, segment_frames=4, idle_lead_frames=6)
    frames = await drain(session, 0.2)
    assert 0 < len(frames) <= 7 and frames[-1].index <= 6   # nothing beyond the lead while the clock stands
    for step in range(1, 4):
        clock.advance(1.0)
        frames += await drain(session, 0.2)
        # never more than the lead ahead of the clock (last index <= clock frames + lead), never starved
        assert step * FPS <= len(frames) and frames[-1].index <= step * FPS + 6
    check_timeline(frames)
    assert not any(f.speech for f in frames)
    assert session.stats()["state"] == "idle"
    await engine.stop()


async def test_speech_after_idle_and_onset(image):
    """Speech pushed while idling goes out right after the idle frames already made, not later."""
    clock = FakeClock()
    engine, session = await open_session(image, TickBackend(), clock, segment_frames=4, idle_lead_frames=6)
    idle = await drain(session, 0.2)
    await session.push_audio(tone(0.4))
    session.end_of_speech()
    rest = await read_until(session, lambda f: f.segment_end)
    check_timeline(idle + rest)
    assert rest[0].speech and all(f.speech for f in rest)
    await engine.stop()


async def test_clear_drops_queued_work_and_returns_to_idle(image):
    clock = FakeClock()
    # the gate holds generation still while clear() and stats() are checked: otherwise a worker thread
    # may already deliver the first post-clear idle frames between the two calls (a test race only)
    gate = threading.Event()
    gate.set()
    backend = TickBackend(on_generate=lambda jobs: gate.wait(10))
    engine, session = await open_session(image, backend, clock, segment_frames=4, output_frames=12, input_seconds=2.0)
    await session.push_audio(tone(1.8))   # fits the input queue
    first = await read_until(session, lambda f: f.speech)
    first += [await session.next_frame() for _ in range(3)]
    assert session.stats()["input_queue_s"] > 0.5
    gate.clear()     # jobs already past the gate belong to the old epoch: clear() discards them
    session.clear()
    st = session.stats()
    gate.set()
    # queued audio and frames are gone; two idle frames holding the last picture bridge to the backend
    assert st["input_queue_s"] == 0 and st["output_queue_frames"] == 2
    after = await drain(session, 0.2)
    check_timeline(first + after)
    assert after and not any(f.speech for f in after)   # straight back to idle
    assert np.array_equal(after[0].image, first[-1].image) and np.array_equal(after[1].image, first[-1].image)
    assert len(after) > 2                                # then the backend's idle frames
    st = session.stats()
    assert st["state"] == "idle" and st["discarded_frames"] + st["dropped_input_s"] > 0
    # the session still works after an interrupt
    await session.push_audio(tone(0.3))
    session.end_of_speech()
    more = await read_until(session, lambda f: f.segment_end)
    check_timeline(first + after + more)
    assert sum(f.speech for f in more) == len(padded(tone(0.3))) // SPF
    await engine.stop()


async def test_fast_producer_gets_backpressure(image):
    engine, session = await open_session(image, TickBackend(), segment_frames=4, output_frames=12, input_seconds=0.5)
    audio = tone(6.0)

    async def produce():
        for i in range(0, len(audio), 1600):
            await session.push_audio(audio[i:i + 1600])
        session.end_of_speech()

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.3)
    assert not producer.done()           # blocked: the consumer has not read anything
    st = session.stats()
    assert st["input_queue_s"] <= 0.5 + 3 * 0.16   # the inbox bound plus the window (segment + look-ahead)
    assert st["output_queue_frames"] + st["inflight_frames"] <= 12
    frames = []
    async for f in session.frames():
        frames.append(f)
        st = session.stats()
        assert st["output_queue_frames"] <= 12 and st["input_queue_s"] <= 1.0
        if f.segment_end:
            break
    await producer
    check_timeline(frames)
    assert np.array_equal(np.concatenate([f.audio for f in frames if f.speech]), padded(audio))
    await engine.stop()


async def test_sessions_are_batched(image):
    backend = TickBackend(delay=0.03)
    engine = await open_engine(backend, segment_frames=4, max_sessions=3, max_batch=3)
    avatar = await engine.prepare_avatar(image)
    assert await engine.prepare_avatar(image.copy()) is avatar and backend.prepared == 1  # cached by content
    for frames in await sessions_say(engine, avatar, 3, tone(1.0)):
        check_own_frames_in_order(frames, tone(1.0))   # each session's state advanced only by its own segments
    assert max(backend.calls) > 1                      # segments of different sessions shared a call
    assert sum(backend.calls) > len(backend.calls)
    assert max(backend.calls) <= 3
    assert engine.stats()["mean_batch"] > 1
    await engine.stop()


async def test_max_sessions(image):
    engine = await open_engine(TickBackend(), max_sessions=2)
    avatar = await engine.prepare_avatar(image)
    a = engine.open_session(avatar)
    engine.open_session(avatar)
    with pytest.raises(EngineFullError) as err:
        engine.open_session(avatar)
    assert isinstance(err.value, EmoStreamError)
    assert engine.sessions == 2
    await a.close()
    await a.close()   # idempotent
    assert engine.sessions == 1
    assert await a.next_frame() is None
    with pytest.raises(EmoStreamError):
        await a.push_audio(tone(0.1))
    engine.open_session(avatar)
    await engine.stop()
    assert engine.sessions == 0


async def test_fall_behind_holds_frames_and_keeps_latency_bounded(image):
    """A backend slower than real time: segments too far past due are held (no backend call), the
    timeline and audio stay intact, and the drops show in the stats."""
    clock = FakeClock()
    backend = TickBackend(on_generate=lambda jobs: clock.advance(0.5))   # 4 frames cost 0.5 s: 3x too slow
    engine, session = await open_session(image, backend, clock, segment_frames=4, max_delay_ms=300)
    audio = tone(3.0)
    await session.push_audio(audio)
    session.end_of_speech()
    frames = await read_until(session, lambda f: f.segment_end)
    check_timeline(frames)
    speech = [f for f in frames if f.speech]
    assert np.array_equal(np.concatenate([f.audio for f in speech]), padded(audio))
    held = [f for f in speech if f.dropped]
    assert held and len(held) < len(speech)
    prev = {f.index: f for f in frames}
    for f in held:
        assert np.array_equal(f.image, prev[f.index - 1].image)
    st = session.stats()
    # (idle segments, also those made after the frames read here, may be held too)
    assert st["dropped_frames"] >= sum(f.dropped for f in frames) >= len(held)
    assert st["late_frames"] > 0
    await engine.stop()


async def test_bad_input_is_a_clear_error(image):
    engine = await open_engine(TickBackend())
    from emo_stream.errors import AudioInputError, ImageInputError

    with pytest.raises(ImageInputError):
        await engine.prepare_avatar(np.zeros((4, 4), np.float32))
    session = engine.open_session(await engine.prepare_avatar(image))
    with pytest.raises(AudioInputError):
        await session.push_audio(np.zeros(100, np.int32))
    with pytest.raises(AudioInputError):
        await session.push_audio(np.zeros(100, np.int16), sample_rate=0)
    with pytest.raises(AudioInputError):
        await session.push_audio(np.full(100, np.nan, np.float32))
    await engine.stop()


class RaisingBackend(TickBackend):
    """Session seed 1 makes the backend raise."""

    def generate(self, jobs):
        if any(j.state["seed"] == 1 for j in jobs):
            raise RuntimeError("boom")
        return super().generate(jobs)


class MisshapenBackend(TickBackend):
    """Session seed 1 gets frames of the wrong shape."""

    def generate(self, jobs):
        out = super().generate(jobs)
        return [f[:, :4] if j.state["seed"] == 1 else f for j, f in zip(jobs, out)]


@pytest.mark.parametrize("backend_cls, max_batch, error", [(RaisingBackend, 1, "boom"),
                                                           (MisshapenBackend, 2, "shape")])
async def test_a_backend_failure_reaches_only_that_session(image, backend_cls, max_batch, error):
    engine = await open_engine(backend_cls(), max_batch=max_batch)
    avatar = await engine.prepare_avatar(image)
    good, bad = engine.open_session(avatar, seed=0), engine.open_session(avatar, seed=1)
    with pytest.raises(EmoStreamError, match=error):
        await read_until(bad, lambda f: False, limit=100)
    assert len(await read_until(good, lambda f: False, limit=5)) == 5
    await engine.stop()


async def test_timestamp_gap_is_filled_with_silence(image):
    engine, session = await open_session(image, TickBackend())
    a = tone(0.2)
    await session.push_audio(a, timestamp=10.0)
    await session.push_audio(a, timestamp=10.5)   # 0.3 s of packets lost
    session.end_of_speech()
    frames = await read_until(session, lambda f: f.segment_end)
    got = np.concatenate([f.audio for f in frames if f.speech])
    np.testing.assert_array_equal(got, padded(np.concatenate([a, np.zeros(4800, np.float32), a])))
    await engine.stop()


class SplitBackend(TickBackend):
    """denoise/decode split: the engine overlaps decoding of one batch with denoising of the next."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.stage_delay = delay
        self.intervals: dict[str, list[tuple[float, float]]] = {"denoise": [], "decode": []}

    def denoise(self, jobs):
        t0 = time.perf_counter()
        time.sleep(self.stage_delay)
        latents = TickBackend.generate(self, jobs)   # advances each job's state here
        self.intervals["denoise"].append((t0, time.perf_counter()))
        return latents

    def decode(self, jobs, latents):
        t0 = time.perf_counter()
        time.sleep(self.stage_delay)
        self.intervals["decode"].append((t0, time.perf_counter()))
        return [x.copy() for x in latents]

    def generate(self, jobs):   # not used when denoise/decode exist
        raise AssertionError("the engine should use denoise/decode")


async def test_split_backend_pipelines_denoise_and_decode(image):
    backend = SplitBackend(delay=0.02)
    engine = await open_engine(backend, segment_frames=4, max_sessions=2, max_batch=1)
    avatar = await engine.prepare_avatar(image)
    for frames in await sessions_say(engine, avatar, 2, tone(1.0)):
        check_own_frames_in_order(frames, tone(1.0))
    # some decode ran while another batch was being denoised
    den, dec = backend.intervals["denoise"], backend.intervals["decode"]
    assert any(a0 < b1 and b0 < a1 for a0, a1 in den for b0, b1 in dec)
    assert set(engine.stats()["stages"]) >= {"denoise", "decode", "encode"}
    await engine.stop()


async def test_concurrent_backend_gets_parallel_workers_in_session_order(image):
    class Concurrent(TickBackend):
        concurrent_generate = True

        def __init__(self) -> None:
            super().__init__(delay=0.02)
            self.intervals: list[tuple[float, float, str]] = []

        def generate(self, jobs):
            t0 = time.perf_counter()
            out = super().generate(jobs)
            self.intervals.append((t0, time.perf_counter(), threading.current_thread().name))
            return out

    backend = Concurrent()
    engine = await open_engine(backend, segment_frames=4, max_sessions=3, max_batch=1, generate_workers=2)
    avatar = await engine.prepare_avatar(image)
    for frames in await sessions_say(engine, avatar, 3, tone(1.2)):
        check_own_frames_in_order(frames, tone(1.2))   # each session's segments went through the backend in order
    iv = backend.intervals
    assert len({name for _, _, name in iv}) == 2
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1, _) in enumerate(iv) for b0, b1, _ in iv[i + 1:])
    await engine.stop()


async def test_stalled_sender_is_flushed_without_segment_end(image):
    clock = FakeClock()
    engine, session = await open_session(image, TickBackend(), clock, segment_frames=4, stall_flush_s=0.5)
    idle = await drain(session, 0.2)
    audio = tone(0.5)[:7000]                    # ends mid-frame, no end_of_speech
    await session.push_audio(audio)
    frames = idle + await drain(session, 0.2)
    assert sum(f.speech for f in frames) < len(padded(audio)) // SPF   # the tail waits for more audio
    clock.advance(1.0)                          # the sender went quiet
    frames += await drain(session, 0.2)
    clock.advance(0.5)
    frames += await drain(session, 0.2)
    check_timeline(frames)
    speech = [f for f in frames if f.speech]
    np.testing.assert_array_equal(np.concatenate([f.audio for f in speech]), padded(audio))
    assert not any(f.segment_end for f in frames)
    assert not frames[-1].speech                # and back to idle
    await engine.stop()


async def test_long_stream_keeps_internal_buffers_bounded(image):
    """A minute of microphone-like 20 ms chunks: the window, arrival records and VAD decisions stay
    small (hours of streaming do not grow memory)."""
    engine, session = await open_session(image, TickBackend(), segment_frames=4, output_frames=12, input_seconds=0.5)
    audio = tone(60.0)
    sizes = []

    async def produce():
        for i in range(0, len(audio), 320):
            await session.push_audio(audio[i:i + 320])
            if i % 32000 == 0:
                w, v = session._window, session._vad
                sizes.append((len(w._buf), len(w._arrival_end), len(v._flags)))
        session.end_of_speech()

    producer = asyncio.create_task(produce())
    n = 0
    async for f in session.frames():
        n += f.speech
        if f.segment_end:
            break
    await producer
    assert n == 60 * FPS
    bufs, arrivals, flags = (max(x) for x in zip(*sizes))
    assert bufs <= (4 + 2 + 1) * SPF + 2 * SPF + 320     # segment + look-ahead + 1 frame, left context, a chunk
    assert arrivals <= 40 and flags <= 40
    await engine.stop()


def test_stage_streams_are_inactive_off_cuda():
    from emo_stream.backend import capabilities
    from emo_stream.streaming.device import StageStreams

    streams = StageStreams(capabilities(TickBackend()).device)
    assert not streams.active
    streams.enter_stage("x")
    assert streams.mark() is None
    streams.wait([None])
    streams.synchronize()


async def test_one_frame_segments(image):
    """The lowest-latency setting: one frame per segment (clear's bridge frames are not tied to it)."""
    engine, session = await open_session(image, TickBackend(), segment_frames=1)
    audio = tone(0.33)
    await session.push_audio(audio)
    session.end_of_speech()
    frames = await read_until(session, lambda f: f.segment_end)
    check_timeline(frames)
    np.testing.assert_array_equal(np.concatenate([f.audio for f in frames if f.speech]), padded(audio))
    session.clear()
    after = await read_until(session, lambda f: f.index >= frames[-1].index + 4)
    check_timeline(frames + after)
    assert not any(f.speech for f in after)
    await engine.stop()


class BatchAudioBackend(TickBackend):
    """Offers encode_audio_batch. The first encoder call waits for `release`, so the segments of every session
    queue up behind it; a window holding the value 0.123 makes the call fail (that session's audio)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.batches: list[int] = []

    def encode_audio(self, audio, start, num_frames):
        self.release.wait(10)
        if np.any(audio == np.float32(0.123)):
            raise RuntimeError("bad audio")
        return super().encode_audio(audio, start, num_frames)

    def encode_audio_batch(self, requests):
        self.release.wait(10)
        self.batches.append(len(requests))
        return [self.encode_audio(*r) for r in requests]


async def release_when_queued(engine, backend) -> None:
    """Lets the held first encode call return once segments of several sessions wait behind it (so the next
    call is a batch)."""
    for _ in range(400):
        if engine.stats()["queues"]["encode"] >= 2:
            break
        await asyncio.sleep(0.01)
    backend.release.set()


@pytest.mark.parametrize("bad", [False, True])
async def test_queued_segments_of_all_sessions_share_one_audio_encoder_call(image, bad):
    """Backends with encode_audio_batch (MuseTalk's whisper) get every segment queued at once in one call, up to
    max_batch, each result back to its own session; a failed batch is retried one by one, so a bad session
    fails alone."""
    backend = BatchAudioBackend()
    engine = await open_engine(backend, segment_frames=4, max_sessions=3, max_batch=3)
    avatar = await engine.prepare_avatar(image)
    sessions = [engine.open_session(avatar, seed=i) for i in range(3)]
    for i, s in enumerate(sessions):
        audio = np.full(16000, 0.123, np.float32) if bad and i == 2 else tone(1.0) * (0.5 + 0.25 * i)
        await s.push_audio(audio)
        s.end_of_speech()
    await release_when_queued(engine, backend)
    good = sessions[:2] if bad else sessions
    results = await asyncio.gather(*(read_until(s, lambda f: f.segment_end) for s in good))
    for frames in results:
        check_timeline(frames)
        for f in (f for f in frames if f.speech):   # each frame rendered from its own session's audio
            assert int(f.image[2, 0, 0]) == min(255, int(np.sqrt(np.mean(f.audio ** 2)) * 1000))
    assert max(backend.batches) > 1 and max(backend.batches) <= 3
    if bad:
        with pytest.raises(EmoStreamError, match="bad audio"):
            await read_until(sessions[2], lambda f: False, limit=100)
    await engine.stop()


async def test_a_failed_audio_batch_retried_one_by_one_counts_each_failure_once(image):
    """A batch that fails is retried per job, and the retries say whose audio failed: the batch's own failure
    is not one more in the 'failed calls in a row' that declares the device broken. Two bad sessions out of
    three fail twice in a row, as they would unbatched; the third keeps talking."""
    backend = BatchAudioBackend()
    engine = await open_engine(backend, segment_frames=4, max_sessions=3, max_batch=3)
    avatar = await engine.prepare_avatar(image)
    sessions = [engine.open_session(avatar, seed=i) for i in range(3)]
    for i, s in enumerate(sessions):
        await s.push_audio(np.full(16000, 0.123, np.float32) if i < 2 else tone(1.0))
        s.end_of_speech()
    await release_when_queued(engine, backend)
    for s in sessions[:2]:
        with pytest.raises(EmoStreamError, match="bad audio"):
            await read_until(s, lambda f: False, limit=100)
    check_timeline(await read_until(sessions[2], lambda f: f.segment_end))
    assert max(backend.batches) > 1 and engine.health.device_error is None
    await engine.stop()
