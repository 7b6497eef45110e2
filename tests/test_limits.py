"""Limits that must hold under concurrency and against hostile clients (issue 23: viewers, connections per
address, buffered messages per connection, avatars per client), each raced for real on loopback sockets."""

from __future__ import annotations

import asyncio

import pytest

from server.app import StreamServer
from server.bot_client import BotClient, BotError
from server.config import load_config

SIZE = 64


@pytest.fixture(scope="module")
def backend():
    from emo_stream.registry import create_backend

    return create_backend("preview", size=SIZE)


async def _server(backend, **limits) -> StreamServer:
    cfg = load_config(None, port=0, size=SIZE, backend="preview")
    cfg.engine.vad = False
    cfg.sessions.max_sessions = 4
    for name, value in limits.items():
        section = cfg.sessions if hasattr(cfg.sessions, name) else cfg.limits
        setattr(section, name, value)
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    return srv


async def _offer() -> tuple[dict, object]:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return {"type": "offer", "sdp": pc.localDescription.sdp}, pc


async def test_max_viewers_holds_when_200_views_arrive_at_once(backend):
    """200 connections send `view` for one session at the same moment against max_viewers 16: exactly 16
    get view_started, the rest a busy error (the limit was checked before an await and counted after)."""
    srv = await _server(backend, max_viewers=16, max_connections_per_address=256)
    offer, pc = await _offer()
    viewers: list[BotClient] = []
    try:
        async with BotClient(srv.base_url) as owner:
            info = await owner.start(frames="none")
            viewers = [BotClient(srv.base_url) for _ in range(200)]
            await asyncio.gather(*(v.connect() for v in viewers))

            async def view(v: BotClient) -> str:
                try:
                    await v.request({"type": "view", "session": info["session"], "webrtc": offer}, timeout=60)
                    return "ok"
                except BotError as exc:
                    return exc.code

            outcomes = await asyncio.gather(*(view(v) for v in viewers))
            assert outcomes.count("ok") == 16, {o: outcomes.count(o) for o in set(outcomes)}
            assert set(outcomes) == {"ok", "busy"}
            assert srv.sessions.get(info["session"]).viewers == 16
            await asyncio.gather(*(v.close() for v in viewers))
            viewers = []
            for _ in range(100):   # every view ended with its connection: the slots are free again
                if srv.sessions.get(info["session"]).viewers == 0:
                    break
                await asyncio.sleep(0.05)
            assert srv.sessions.get(info["session"]).viewers == 0
    finally:
        await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
        await pc.close()
        await srv.stop()


async def test_connections_per_address_are_limited(backend):
    """More connections from one address than limits.max_connections_per_address: the extra ones are
    closed (1013, try again later) even when they all arrive together; closing one frees its place."""
    srv = await _server(backend, max_connections_per_address=5)
    bots = [BotClient(srv.base_url) for _ in range(12)]
    try:
        await asyncio.gather(*(b.connect() for b in bots))

        async def alive(b: BotClient) -> bool:
            try:
                return (await b.request({"type": "ping"}, timeout=10))["type"] == "pong"
            except Exception:
                return False

        results = await asyncio.gather(*(alive(b) for b in bots))
        assert sum(results) == 5, results
        refused = [b for b, ok in zip(bots, results) if not ok]
        assert all(b.ws.close_code == 1013 for b in refused), [b.ws.close_code for b in refused]
        assert srv.health()["connections"] == 5
        await next(b for b, ok in zip(bots, results) if ok).close()
        for _ in range(100):
            if srv.health()["connections"] == 4:
                break
            await asyncio.sleep(0.02)
        async with BotClient(srv.base_url) as again:
            assert (await again.request({"type": "ping"}))["type"] == "pong"
    finally:
        await asyncio.gather(*(b.close() for b in bots), return_exceptions=True)
        await srv.stop()
