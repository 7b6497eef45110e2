"""A failing backend call ends one session only; a broken device makes the engine unhealthy; a call that never returns
is caught by the watchdog. Engine, WebSocket server (/healthz) and LiveKit worker, with tests/fault_backend.py."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from emo_stream.errors import EmoStreamError
from emo_stream.streaming import (BackendStalledError, EngineConfig, EngineUnhealthyError, MonotonicClock,
                                  StreamingEngine)
from fault_backend import FaultBackend, SplitFaultBackend

pytestmark = pytest.mark.timeout(120)

IMAGE = np.zeros((64, 64, 3), np.uint8)


async def engine_with(backend: FaultBackend, **cfg) -> StreamingEngine:
    cfg.setdefault("vad", False)
    cfg.setdefault("segment_frames", 1)
    cfg.setdefault("max_sessions", 4)
    cfg.setdefault("max_batch", 4)
    # held frames (fall-behind policy) then mean a stall of seconds, not a busy moment of this shared machine
    cfg.setdefault("max_delay_ms", 5000.0)
    engine = StreamingEngine(backend, EngineConfig(**cfg), clock=MonotonicClock())
    await engine.start()
    return engine


async def frames_of(session, n: int, guard: float = 30.0) -> list:
    """The next n frames (a hang guard, not a speed assertion)."""
    async def read():
        return [await session.next_frame() for _ in range(n)]
    return await asyncio.wait_for(read(), guard)


async def error_of(session, guard: float = 30.0) -> BaseException:
    async def read():
        while True:
            await session.next_frame()
    with pytest.raises(EmoStreamError) as caught:
        await asyncio.wait_for(read(), guard)
    return caught.value


async def test_out_of_memory_in_one_batch_ends_that_session_alone():
    backend = FaultBackend(oom_seeds={1})
    engine = await engine_with(backend, generate_workers=1)
    avatar = await engine.prepare_avatar(IMAGE)
    sessions = [engine.open_session(avatar, seed=s) for s in range(3)]
    # all three read at once, as their viewers would
    err, *good = await asyncio.gather(error_of(sessions[1]), frames_of(sessions[0], 75), frames_of(sessions[2], 75))
    assert "generation failed: OutOfMemoryError: CUDA out of memory" in str(err)
    for frames in good:   # every frame newly drawn, none held by the fall-behind policy, in order
        assert not any(f.dropped for f in frames)
        assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + 75))
    # the failing batch was split until seed 1 was alone, and its queued work was dropped with it:
    # [0, 1, 2] -> [0] + [1, 2] -> [1] + [2], or [0, 1] -> [0] + [1]
    assert [1] in backend.calls
    assert sum(1 for c in backend.calls if 1 in c) <= 3
    assert engine.health.status()["status"] == "ok"
    assert engine.health.status()["retried_calls"] >= 1
    await engine.stop()


@pytest.mark.parametrize("one_object", [False, True], ids=["latents-per-job", "select_latents"])
async def test_out_of_memory_in_one_decode_batch_ends_that_session_alone(one_object):
    """A split backend's decode batch is retried in halves as the denoise batch is: the failing session ends,
    the others in its batch get every frame (before, the whole decode batch failed)."""
    backend = SplitFaultBackend(decode_oom_seeds={1}, one_object=one_object)
    engine = await engine_with(backend, generate_workers=1)
    assert engine.capabilities.split
    avatar = await engine.prepare_avatar(IMAGE)
    sessions = [engine.open_session(avatar, seed=s) for s in range(3)]
    err, *good = await asyncio.gather(error_of(sessions[1]), frames_of(sessions[0], 75), frames_of(sessions[2], 75))
    assert "OutOfMemoryError: CUDA out of memory" in str(err)
    for frames in good:   # every frame newly drawn, none held by the fall-behind policy, in order
        assert not any(f.dropped for f in frames)
        assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + 75))
    assert [1] in backend.decode_calls                        # split until seed 1 was alone
    assert any(len(c) > 1 and 1 in c for c in backend.decode_calls)   # it did start in a batch with others
    status = engine.health.status()
    assert status["status"] == "ok" and status["retried_calls"] >= 1
    await engine.stop()


async def test_a_batch_that_runs_out_of_memory_once_is_retried_and_nobody_fails():
    backend = FaultBackend(oom_batches_over=1, oom_times=1)
    engine = await engine_with(backend, generate_workers=1)
    avatar = await engine.prepare_avatar(IMAGE)
    sessions = [engine.open_session(avatar, seed=s) for s in range(3)]
    for frames in await asyncio.gather(*(frames_of(s, 40) for s in sessions)):
        assert not any(f.dropped for f in frames)
    assert backend.oom_times == 0                      # it did fail once
    status = engine.health.status()
    assert status["status"] == "ok" and status["retried_calls"] >= 1 and status["failed_calls"] >= 1
    await engine.stop()


@pytest.mark.parametrize("unhealthy_after", [3, 100])
async def test_a_persistent_device_error_makes_the_engine_unhealthy(unhealthy_after):
    """A CUDA device error is recognised at once; the count of failures in a row catches errors it cannot name."""
    backend = FaultBackend(device_error_after=10)
    engine = await engine_with(backend, unhealthy_after_failures=unhealthy_after)
    avatar = await engine.prepare_avatar(IMAGE)
    sessions = [engine.open_session(avatar, seed=s) for s in range(2)]
    errors = [await error_of(s) for s in sessions]
    assert any("illegal memory access" in str(e) for e in errors)
    status = engine.health.status()
    assert status["status"] == "device_error" and "illegal memory access" in status["reason"]
    with pytest.raises(EngineUnhealthyError, match="device_error"):
        engine.open_session(avatar, seed=5)
    await engine.stop()


async def test_unnamed_errors_in_a_row_make_the_engine_unhealthy():
    class Broken(FaultBackend):
        def generate(self, jobs):
            raise ValueError("the model returned garbage")

    engine = await engine_with(Broken(), unhealthy_after_failures=3, max_batch=1)
    avatar = await engine.prepare_avatar(IMAGE)
    for seed in range(3):     # each session fails on its own; the third failure in a row is the device's
        assert engine.health.healthy
        assert "garbage" in str(await error_of(engine.open_session(avatar, seed=seed)))
    assert engine.health.status()["status"] == "device_error"
    await engine.stop()


async def test_watchdog_fails_a_call_that_never_returns():
    backend = FaultBackend(hang_seeds={1})
    engine = await engine_with(backend, call_timeout_s=0.5, generate_workers=2, max_batch=1)
    try:
        avatar = await engine.prepare_avatar(IMAGE)
        good, hung = engine.open_session(avatar, seed=0), engine.open_session(avatar, seed=1)
        reading = asyncio.ensure_future(frames_of(good, 30))  # the other generator worker keeps this one going
        err = await error_of(hung, guard=20)
        assert isinstance(err, BackendStalledError) and "within 0.5 s" in str(err)
        frames = await reading
        assert not any(f.dropped for f in frames)
        assert engine.health.status()["status"] == "stalled"
        with pytest.raises(EngineUnhealthyError, match="stalled"):
            engine.open_session(avatar, seed=2)
        backend.release.set()                           # the call returns at last: its answer is dropped
        for _ in range(100):
            if engine.health.healthy:
                break
            await asyncio.sleep(0.05)
        assert engine.health.status()["status"] == "ok"
        assert engine.open_session(avatar, seed=3) is not None
    finally:
        backend.release.set()
        await engine.stop()


async def test_watchdog_with_no_worker_left_fails_every_session():
    backend = FaultBackend(hang_seeds={1})
    engine = await engine_with(backend, call_timeout_s=0.5, generate_workers=1, max_batch=1)
    try:
        avatar = await engine.prepare_avatar(IMAGE)
        other, hung = engine.open_session(avatar, seed=0), engine.open_session(avatar, seed=1)
        assert isinstance(await error_of(hung, guard=20), BackendStalledError)
        err = await error_of(other, guard=20)            # nothing would make its frames: it hears so
        assert isinstance(err, EngineUnhealthyError) and "stalled" in str(err)
    finally:
        backend.release.set()
        await engine.stop()


# ---- the server: error events, session_ended, /healthz ----------------------------------------------------------
async def _get(url: str) -> tuple[int, dict]:
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
    return await asyncio.to_thread(fetch)


async def _server(backend):
    from server.app import StreamServer
    from server.config import load_config

    cfg = load_config(None, port=0, size=64, backend="synctest")
    cfg.engine.vad = False
    cfg.sessions.max_sessions = 3
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    return srv


async def _events_until(bot, kind: str, guard: float = 30.0) -> list[dict]:
    from server.bot_client import ReceivedFrame

    got = []
    async for item in bot.receive(timeout=guard):
        if not isinstance(item, ReceivedFrame):
            got.append(item)
            if item.get("type") == kind:
                return got
    raise AssertionError(f"no {kind}: {got}")


async def test_websocket_session_gets_a_clear_error_and_ends_the_others_go_on():
    from server.bot_client import BotClient, ReceivedFrame

    backend = FaultBackend(oom_seeds={1})
    srv = await _server(backend)
    try:
        async with BotClient(srv.base_url) as good, BotClient(srv.base_url) as bad:
            await good.start(frames="jpeg", seed=0)
            await bad.start(frames="jpeg", seed=1)
            async def good_items() -> list:
                got = []
                async for item in good.receive(timeout=30):
                    got.append(item)
                    if sum(isinstance(i, ReceivedFrame) for i in got) == 60:
                        return got

            events, items = await asyncio.gather(_events_until(bad, "session_ended"), good_items())
            errors = [e for e in events if e.get("type") == "error"]
            assert errors and errors[0]["code"] == "generation_failed" and errors[0]["fatal"] is True
            assert "CUDA out of memory" in errors[0]["message"]
            assert "generation failed" in events[-1]["reason"]
            # the other session heard nothing of it, and its frames went on
            assert not [i for i in items if not isinstance(i, ReceivedFrame) and i.get("type") in ("error", "session_ended")]
            indices = [i.index for i in items if isinstance(i, ReceivedFrame)]
            assert indices == sorted(set(indices))
            status, health = await _get(srv.base_url + "/healthz")
            assert status == 200 and health["status"] == "ok" and health["sessions"] == 1
    finally:
        await srv.stop()


async def test_healthz_says_unhealthy_after_a_device_error():
    from server.bot_client import BotClient, BotError

    srv = await _server(FaultBackend(device_error_after=5))
    try:
        async with BotClient(srv.base_url) as bot:
            await bot.start(frames="jpeg")
            events = await _events_until(bot, "session_ended")
            assert any(e.get("code") == "generation_failed" and "illegal memory access" in e["message"]
                       for e in events)
            status, health = await _get(srv.base_url + "/healthz")
            assert status == 503 and health["status"] == "device_error"
            assert "illegal memory access" in health["reason"]
            with pytest.raises(BotError) as refused:       # no new sessions on a broken device
                await bot.start(frames="jpeg")
            assert refused.value.code == "unavailable"
    finally:
        await srv.stop()


# ---- the LiveKit worker -----------------------------------------------------------------------------------------
async def test_livekit_worker_stops_taking_rooms_when_its_engine_is_unhealthy():
    pytest.importorskip("livekit.agents")
    from livekit.agents import JobRequest
    from livekit.protocol import agent as agent_proto
    from livekit.protocol import models

    from emo_stream.livekit.host import EngineHost
    from emo_stream.livekit.metadata import DispatchInfo
    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig

    backend = FaultBackend(device_error_after=3)
    host = EngineHost(await engine_with(backend))
    worker = AvatarWorker(host, WorkerConfig(agent_name="emo-stream"))
    server = worker.build_server()
    answers = []

    async def on_reject(terminate: bool) -> None:
        answers.append(("reject", terminate))

    async def on_accept(args) -> None:
        answers.append(("accept",))

    try:
        avatar = await host.engine.prepare_avatar(IMAGE)
        assert host.reserve()
        session = host.open_session(avatar)
        assert "illegal memory access" in str(await error_of(session))
        await session.close()
        host.release()
        assert host.load == 1.0 and server._load_fnc() == 1.0     # LiveKit sends its rooms elsewhere
        info = DispatchInfo(avatar_identity="avatar-1", sender_identity="agent-1")
        job = agent_proto.Job(id="job-1", room=models.Room(name="room-1", sid="RM_1"), metadata=info.to_json(),
                              agent_name="emo-stream")
        await worker.on_request(JobRequest(job=job, on_reject=on_reject, on_accept=on_accept))
        assert answers == [("reject", False)]
    finally:
        await host.stop()


async def test_livekit_room_whose_session_fails_ends_with_the_reason():
    pytest.importorskip("livekit.agents")
    from livekit.agents import JobRequest
    from livekit.protocol import agent as agent_proto
    from livekit.protocol import models
    from livekit_standin import Hub, LoopThread, StandInRoom
    from test_livekit import AGENT, RATE, Agent, JobContextStandIn

    from emo_stream.livekit.host import EngineHost
    from emo_stream.livekit.metadata import DispatchInfo
    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig

    host = EngineHost(await engine_with(FaultBackend(oom_seeds={5})))
    worker = AvatarWorker(host, WorkerConfig())

    async def accept(args):
        pass

    try:
        hub = Hub()
        info = DispatchInfo(avatar_identity="avatar-f1", sender_identity="agent-f1", sample_rate=RATE, seed=5)
        job = agent_proto.Job(id="f1", room=models.Room(name="room-f1"), metadata=info.to_json())
        await worker.on_request(JobRequest(job=job, on_reject=None, on_accept=accept))
        agent = Agent(hub, "room-f1", "agent-f1", "avatar-f1")
        await agent.connect()
        ctx = JobContextStandIn(job, StandInRoom(hub, "room-f1", "avatar-f1", kind=AGENT))
        thread = LoopThread("job-f1")
        await asyncio.wait_for(thread.submit(worker.entrypoint(ctx)), 30)
        thread.close()
        assert len(ctx.reasons) == 1 and "generation failed: OutOfMemoryError: CUDA out of memory" in ctx.reasons[0]
        assert host.free_slots == host.capacity and host.healthy      # one room's failure, not the device's
        await agent.room.disconnect()
    finally:
        await host.stop()
