"""What a closed session leaves behind: nothing. The hour at capacity (bench/soak.py) grew 53 MiB because every
closed session and peer connection waited, as reference cycles, for a full collection that hardly ever came.

Loopback only; a few session cycles, bounded in time. The collector's automatic passes are switched off
in these tests, so what is freed is freed by reference counting or by the server's own sweep."""

from __future__ import annotations

import asyncio
import collections
import fractions
import gc
import time
import weakref

import numpy as np
import pytest

from server import sessions as sessions_module
from server.app import StreamServer
from server.bot_client import BotClient, ReceivedFrame
from server.config import load_config

SIZE = 64
SERVER_TYPES = ("ServerSession", "StreamSession", "Playout", "Subscription", "Outbox", "PlayoutVideoTrack",
                "PlayoutAudioTrack")


@pytest.fixture
def no_automatic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
async def server(no_automatic_gc, monkeypatch):
    monkeypatch.setattr(sessions_module, "_SWEEP_DELAY_S", 0.3)
    cfg = load_config(None, port=0, size=SIZE, backend="synctest")
    cfg.engine.vad = False
    cfg.sessions.max_sessions = 2
    srv = StreamServer(cfg)
    await srv.start()
    yield srv
    await srv.stop()


def _live(types=SERVER_TYPES) -> dict:
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return {k: counts[k] for k in types if counts[k]}


def _beeps(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (8000 * np.sin(2 * np.pi * 440 * t) * ((t % 0.5) < 0.1)).astype(np.int16)


async def _ws_cycle(srv: StreamServer, refs: list) -> None:
    """Start, speak, interrupt, speak to the end, stop: as a bot does."""
    pcm = _beeps(1.2)
    async with BotClient(srv.base_url) as bot:
        info = await bot.start(sample_rate=16000, frames="jpeg")
        session = srv.sessions.get(info["session"])
        refs += [weakref.ref(session), weakref.ref(session.playout), weakref.ref(session.engine_session)]
        del session
        for clear in (True, False):
            for i in range(0, len(pcm), 320):
                await bot.send_audio(pcm[i:i + 320])
            if clear:
                await bot.clear()
            else:
                await bot.end_segment()
        frames = 0
        async for item in bot.receive(timeout=20):
            frames += isinstance(item, ReceivedFrame)
            if isinstance(item, dict) and item.get("type") == "playback_finished" and not item["interrupted"]:
                break
        assert frames > 10
        await bot.stop()
        async for item in bot.receive(timeout=10):
            if isinstance(item, dict) and item.get("type") == "session_ended":
                break


async def _gone(refs: list, seconds: float) -> list:
    """The referents still alive after waiting up to `seconds` (no collection of ours)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(r() is not None for r in refs):
        await asyncio.sleep(0.1)
    return [type(r()).__name__ for r in refs if r() is not None]


async def test_a_closed_websocket_session_goes_with_its_last_reference(server):
    """No collector at all: the session, its playout and its engine session are freed as they close (their
    callbacks and the finished playout task no longer hold them in a cycle)."""
    before = _live()
    for _ in range(3):
        refs: list = []
        await _ws_cycle(server, refs)
        sessions_module._sweep and sessions_module._sweep[1].cancel()   # the sweep is not what frees these
        sessions_module._sweep = None
        assert await _gone(refs, 5.0) == []
    assert len(server.sessions) == 0
    # the connections' own objects (websockets keeps each in cycles) go with the server's sweep
    sessions_module.collect_soon()
    end = time.monotonic() + 5
    while _live() != before and time.monotonic() < end:
        await asyncio.sleep(0.1)
    assert _live() == before


class _Beeper:
    """A talk page's microphone for aiortc: beeps, 20 ms Opus-sized frames in real time."""

    def __new__(cls):
        import av
        from aiortc.mediastreams import MediaStreamTrack

        class Mic(MediaStreamTrack):
            kind = "audio"

            def __init__(self):
                super().__init__()
                self.n, self.t0 = 0, None

            async def recv(self):
                self.t0 = self.t0 or time.monotonic()
                await asyncio.sleep(max(0.0, self.t0 + self.n * 0.02 - time.monotonic()))
                x = (np.sin(np.arange(960) * 0.06) * 8000 * ((self.n // 10) % 2)).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(x[None], format="s16", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 48000, self.n * 960, fractions.Fraction(1, 48000)
                self.n += 1
                return frame

        return Mic()


async def _rtc_client(srv: StreamServer, message: dict, seconds: float, mic: bool) -> int:
    """A WebRTC peer (aiortc as the browser) over /api/ws: the talk page (mic) or a viewer; video frames got."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if mic:
        pc.addTrack(_Beeper())
        pc.addTransceiver("video", direction="recvonly")
    else:
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
    got = collections.Counter()
    readers = []

    async def read(track):
        try:
            while True:
                await track.recv()
                got[track.kind] += 1
        except MediaStreamError:
            pass

    pc.on("track", lambda track: readers.append(asyncio.ensure_future(read(track))))
    await pc.setLocalDescription(await pc.createOffer())
    async with BotClient(srv.base_url) as ws:
        reply = await ws.request({**message, "webrtc": {"type": "offer", "sdp": pc.localDescription.sdp}})
        await pc.setRemoteDescription(RTCSessionDescription(**reply["answer"]))
        await asyncio.sleep(seconds)
        await pc.close()
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return got["video"]


async def test_webrtc_sessions_and_viewers_leave_nothing_behind(server):
    """A talk-page session watched by a viewer, twice: once closed, the server's peer connections (aiortc keeps
    them in cycles) are freed by the server's own sweep, and its sessions, playouts, subscriptions and tasks
    are back to what they were."""
    import server.rtc as rtc

    pcs: list = []
    made = rtc.RTCPeerConnection

    class Tracked(made):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pcs.append(weakref.ref(self))

    rtc.RTCPeerConnection = Tracked
    try:
        before, tasks_before = _live(), len(asyncio.all_tasks())
        for _ in range(2):
            talk = asyncio.create_task(_rtc_client(server, {"type": "start"}, 3.0, mic=True))
            await asyncio.sleep(1.0)
            viewed = await _rtc_client(server, {"type": "view", "session": "latest"}, 1.2, mic=False)
            assert await talk > 10 and viewed > 5
        assert len(pcs) == 4
        assert await _gone(pcs, 10.0) == []   # no collection of ours: the server's sweep freed them
        end = time.monotonic() + 5
        while (_live() != before or len(asyncio.all_tasks()) > tasks_before) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert _live() == before
        assert len(asyncio.all_tasks()) <= tasks_before, [t.get_name() for t in asyncio.all_tasks()]
    finally:
        rtc.RTCPeerConnection = made


def test_a_sweep_left_pending_on_a_closed_loop_does_not_block_the_next_loops(monkeypatch):
    """A server stopped with its sweep still pending (its loop closed first) must not leave every later
    server in the process without one."""
    monkeypatch.setattr(sessions_module, "_SWEEP_DELAY_S", 0.05)
    monkeypatch.setattr(sessions_module, "_sweep", None)

    async def close_then_stop() -> None:
        sessions_module.collect_soon()   # its loop ends before the pass is due

    async def close_then_wait() -> None:
        sessions_module.collect_soon()
        await asyncio.sleep(0.3)

    asyncio.run(close_then_stop())
    before = sessions_module.SWEEPS["n"]
    asyncio.run(close_then_wait())
    assert sessions_module.SWEEPS["n"] == before + 1


def test_a_sweep_gives_freed_heap_back_to_the_system(monkeypatch):
    """After the pass, glibc's free pages go back (malloc_trim, off the loop): freed memory must not stay
    held by the process for good."""
    calls: list[int] = []
    monkeypatch.setattr(sessions_module, "_SWEEP_DELAY_S", 0.05)
    monkeypatch.setattr(sessions_module, "_sweep", None)
    monkeypatch.setattr(sessions_module, "_malloc_trim", lambda pad: calls.append(pad) or 1)

    async def close_then_wait() -> None:
        sessions_module.collect_soon()
        await asyncio.sleep(0.5)

    asyncio.run(close_then_wait())
    assert calls == [0]


def test_the_mmap_threshold_is_fixed_where_glibc_is_there():
    """serve fixes glibc's mmap threshold (frame-sized blocks are unmapped when freed, not kept in arenas)."""
    from server.allocator import fix_mmap_threshold, glibc_function

    if glibc_function("mallopt") is None:
        pytest.skip("not glibc")
    assert fix_mmap_threshold() is True
