"""End to end against a real LiveKit server: our worker registers, an agent dispatches it with
AvatarSession, speaks one utterance, and a viewer in the room receives the avatar's video and audio.

Skipped unless LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET are set (no server can be installed
on the CI machines). To run it:

    # a local server: https://docs.livekit.io/home/self-hosting/local/ (livekit-server --dev prints
    # the dev key "devkey" / secret "secret")
    export LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret
    pip install -e ".[test,livekit]"
    python -m pytest -q tests/test_livekit_e2e.py -s

It uses the CPU preview backend and a unique agent name, so other workers on the server are untouched.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="needs the livekit extra: pip install -e '.[livekit]'")

NEEDED = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
pytestmark = [
    pytest.mark.skipif(not all(os.environ.get(k) for k in NEEDED),
                       reason="set LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET to run against a real server"),
    pytest.mark.timeout(180),
]

RATE = 24000


def _token(identity: str, room: str, *, agent: bool) -> str:
    from livekit import api

    token = api.AccessToken(os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]).with_identity(identity)
    if agent:
        token = token.with_kind("agent")
    return token.with_grants(api.VideoGrants(room_join=True, room=room, agent=agent)).to_jwt()


async def test_worker_against_a_real_livekit_server():
    from types import SimpleNamespace

    from livekit import rtc
    from livekit.agents import utils

    from emo_stream.livekit import AvatarSession
    from emo_stream.livekit.host import EngineHost
    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig
    from emo_stream.families.preview.backend import PreviewBackend
    from emo_stream.streaming import EngineConfig, StreamingEngine

    agent_name = f"emo-stream-test-{uuid.uuid4().hex[:6]}"
    room_name = f"emo-stream-e2e-{uuid.uuid4().hex[:6]}"
    host = EngineHost(StreamingEngine(PreviewBackend(size=128), EngineConfig(segment_frames=2, max_sessions=2)))
    await host.start()
    worker = AvatarWorker(host, WorkerConfig(agent_name=agent_name, http_port=0, idle_threads=0))
    server = worker.build_server()
    server_task = asyncio.ensure_future(server.run(devmode=False))
    agent_room, viewer_room = rtc.Room(), rtc.Room()
    try:
        await asyncio.sleep(2)   # registration
        await agent_room.connect(os.environ["LIVEKIT_URL"], _token("agent-e2e", room_name, agent=True))
        await viewer_room.connect(os.environ["LIVEKIT_URL"], _token("viewer-e2e", room_name, agent=False))

        class AgentSessionStandIn(rtc.EventEmitter):
            def __init__(self):
                super().__init__()
                self.output = SimpleNamespace(audio=None)

        agent_session = AgentSessionStandIn()
        avatar = AvatarSession(agent_name=agent_name)
        await avatar.start(agent_session, room=agent_room)
        await avatar.wait_for_join(timeout=60)

        video_pub = await utils.wait_for_track_publication(room=viewer_room, identity=avatar.avatar_identity,
                                                           kind=rtc.TrackKind.KIND_VIDEO, wait_for_subscription=True)
        audio_pub = await utils.wait_for_track_publication(room=viewer_room, identity=avatar.avatar_identity,
                                                           kind=rtc.TrackKind.KIND_AUDIO, wait_for_subscription=True)
        video = rtc.VideoStream(video_pub.track)
        audio = rtc.AudioStream(audio_pub.track, sample_rate=RATE, num_channels=1)
        frames, heard = [], []

        async def read_video():
            async for ev in video:
                frames.append((ev.frame.width, ev.frame.height))

        async def read_audio():
            async for ev in audio:
                heard.append(np.frombuffer(ev.frame.data, dtype=np.int16).copy())

        readers = [asyncio.ensure_future(read_video()), asyncio.ensure_future(read_audio())]

        finished = []
        out = agent_session.output.audio
        out.on("playback_finished", finished.append)
        t = np.arange(int(1.5 * RATE)) / RATE
        pcm = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
        for i in range(0, len(pcm), 480):
            part = pcm[i:i + 480]
            await out.capture_frame(rtc.AudioFrame(part.tobytes(), RATE, 1, len(part)))
        out.flush()
        t0 = time.monotonic()
        while not finished:
            assert time.monotonic() - t0 < 30, "no lk.playback_finished from the worker"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        for r in readers:
            r.cancel()

        assert finished[0].playback_position == pytest.approx(1.5, abs=0.05)
        assert not finished[0].interrupted
        assert len(frames) > 25 and (128, 128) in frames                # the avatar's video reached the viewer
        loud = np.abs(np.concatenate(heard).astype(np.int32)) > 2000
        assert loud.sum() > 0.8 * RATE                                  # and the agent's voice with it (Opus)
        await avatar.aclose()
    finally:
        await agent_room.disconnect()
        await viewer_room.disconnect()
        await server.aclose()
        server_task.cancel()
        await host.stop()
