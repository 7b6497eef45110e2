"""One engine, sessions opened from several event loops (one per thread, as LiveKit job threads do)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from emo_stream.streaming import EngineConfig, StreamingEngine, UnknownAvatarError
from emo_stream.streaming.avatars import AvatarCache, SourceIndex
from test_streaming import SIZE, SPF, TickBackend, padded, tone

pytestmark = pytest.mark.timeout(60)


def run_in_thread(coro_fn, *args) -> threading.Thread:
    """Run coro_fn(*args) on a fresh event loop in its own thread; the result lands in thread.result."""
    def target():
        try:
            thread.result = asyncio.run(coro_fn(*args))
        except BaseException as exc:   # surfaced by the test
            thread.result = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread


async def test_sessions_from_several_loops_share_one_engine():
    backend = TickBackend()
    engine = StreamingEngine(backend, EngineConfig(segment_frames=4, vad=False, max_batch=4))
    await engine.start()
    image = np.full((32, 32, 3), 77, np.uint8)
    gate = threading.Barrier(3)

    async def job(freq: float):
        avatar = await engine.prepare_avatar(image)          # same photo from every loop: prepared once
        session = engine.open_session(avatar, seed=int(freq))
        await asyncio.to_thread(gate.wait)                   # all sessions open at once
        audio = tone(0.4, freq=freq)
        await session.push_audio(audio)
        session.end_of_speech()
        speech = []
        async for frame in session.frames():
            if frame.speech:
                speech.append(frame.audio)
            if frame.segment_end:
                break
        await session.close()
        return audio, np.concatenate(speech)

    threads = [run_in_thread(job, f) for f in (200.0, 300.0, 400.0)]
    await asyncio.gather(*(asyncio.to_thread(t.join, 30) for t in threads))
    for t in threads:
        assert not isinstance(t.result, BaseException), t.result
        sent, received = t.result
        np.testing.assert_array_equal(received, padded(sent))   # each session got its own audio back
    assert backend.prepared == 1
    assert engine.sessions == 0
    await engine.stop()


async def test_stopping_the_engine_ends_sessions_on_other_loops():
    engine = StreamingEngine(TickBackend(), EngineConfig(segment_frames=4, vad=False))
    await engine.start()
    avatar = await engine.prepare_avatar(np.full((32, 32, 3), 5, np.uint8))
    opened = threading.Event()

    async def job():
        session = engine.open_session(avatar)
        opened.set()
        n = 0
        async for frame in session.frames():   # idle frames until the engine stops
            assert frame.image.shape == (SIZE, SIZE, 3) and len(frame.audio) == SPF
            n += 1
        return n

    thread = run_in_thread(job)
    await asyncio.to_thread(opened.wait, 10)
    await asyncio.sleep(0.2)
    await engine.stop()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive() and isinstance(thread.result, int) and thread.result > 0


async def test_avatars_by_id_and_open_session_needs_a_loop():
    engine = StreamingEngine(TickBackend(), EngineConfig(vad=False))
    await engine.start()
    handle = await engine.prepare_avatar(np.full((32, 32, 3), 9, np.uint8))
    assert engine.avatar(handle.id) is handle
    with pytest.raises(UnknownAvatarError, match="unknown avatar 'nope'"):
        engine.avatar("nope")
    with pytest.raises(RuntimeError, match="needs an event loop"):
        await asyncio.to_thread(engine.open_session, handle)
    await engine.stop()


async def test_source_index_finds_a_prepared_source_until_the_cache_drops_it():
    prepared: list[int] = []
    cache = AvatarCache(lambda image: prepared.append(int(image[0, 0, 0])), max_avatars=1)
    index = SourceIndex(cache.get, max_keys=2)
    first = await cache.prepare(np.full((8, 8, 3), 1, np.uint8))
    index.remember("a.png", first)
    assert index.lookup("a.png") is first and index.lookup("b.png") is None
    await cache.prepare(np.full((8, 8, 3), 2, np.uint8))   # the cache holds one: "a.png"'s avatar is dropped
    assert index.lookup("a.png") is None and prepared == [1, 2]
