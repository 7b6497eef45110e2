"""emo-stream as a LiveKit Agents avatar worker, checked with the real livekit / livekit-agents packages.

No LiveKit server runs here, so the agent side (livekit-agents' own DataStreamAudioOutput) and our
worker's job (livekit-agents' DataStreamAudioReceiver + AvatarRunner over our EngineVideoGenerator and
the preview backend) meet in an in-process room stand-in (tests/livekit_standin.py) that implements
the byte-stream, RPC, participant and track calls the SDK makes. Each worker job runs on its own
thread and event loop, as livekit-agents' THREAD executor runs them, sharing one engine.

The published audio is read back from the real local audio track with rtc.AudioStream.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="needs the livekit extra: pip install -e '.[livekit]'")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import DataStreamAudioOutput  # noqa: E402

from emo_stream.livekit.host import EngineHost  # noqa: E402
from emo_stream.livekit.job import run_avatar_job  # noqa: E402
from emo_stream.livekit.metadata import DispatchInfo  # noqa: E402
from emo_stream.streaming import EngineConfig, StreamingEngine  # noqa: E402
from livekit_standin import Hub, LoopThread, StandInRoom  # noqa: E402

pytestmark = pytest.mark.timeout(120)

RATE = 24000          # the agent's TTS rate (DataStreamAudioOutput sends it unchanged)
FPS = 25
SPF = RATE // FPS     # 960 samples of agent audio per video frame
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


@pytest.fixture(scope="module")
def host():
    from emo_stream.families.preview.backend import PreviewBackend

    h = EngineHost(StreamingEngine(PreviewBackend(size=64), EngineConfig(segment_frames=2, max_sessions=3, vad=False)))
    asyncio.run(h.start())       # on a loop of its own: every job opens its session on its own loop
    yield h
    asyncio.run(h.stop())


@pytest.fixture(scope="module")
def avatar(host):
    from emo_stream.default_avatar import default_portrait

    async def prepare():
        return await host.prepare_avatar("default", lambda: default_portrait(256))

    return asyncio.run(prepare())


def tts_audio(seconds: float, seed: int) -> np.ndarray:
    """Speech-like int16 with no zero sample (so inserted silence can be told apart from it)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    env = 0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 3 * t))
    x = (env * 9000 * np.sin(2 * np.pi * 180 * t + rng.uniform(0, 6))).astype(np.int16)
    x[x == 0] = 1
    return x


class Worker:
    """One job of our worker in a room: its own thread and event loop, like the THREAD executor."""

    def __init__(self, hub: Hub, host: EngineHost, avatar, room_name: str, agent_identity: str,
                 info: DispatchInfo | None = None, reserved: bool = False) -> None:
        self.info = info or DispatchInfo(avatar_identity=f"avatar-{room_name}", sender_identity=agent_identity,
                                         sample_rate=RATE)
        self.room = StandInRoom(hub, room_name, self.info.avatar_identity, kind=AGENT)
        self.thread = LoopThread(f"job-{room_name}")
        self.started = asyncio.Event()
        self.generator = None
        self.runner = None
        loop = asyncio.get_running_loop()

        def on_started(runner, generator):
            generator.trace = __import__("collections").deque(maxlen=100000)
            self.runner, self.generator = runner, generator
            loop.call_soon_threadsafe(self.started.set)

        if not reserved:
            assert host.reserve(), "no free slot"    # what AvatarWorker.on_request does before accepting

        async def job():
            await self.room.connect()
            await run_avatar_job(self.room, host, self.info, avatar, on_started=on_started)

        self.done = self.thread.submit(job())

    async def published(self) -> tuple[rtc.LocalAudioTrack, rtc.LocalVideoTrack]:
        for _ in range(500):
            kinds = {p.kind: p.track for p in self.room.published}
            if len(kinds) == 2:
                return kinds[rtc.TrackKind.KIND_AUDIO], kinds[rtc.TrackKind.KIND_VIDEO]
            await asyncio.sleep(0.01)
        raise AssertionError("the avatar never published its tracks")

    async def stop(self) -> None:
        await self.thread.submit(self.room.disconnect())
        try:
            await asyncio.wait_for(self.done, 10)
        finally:
            self.thread.close()


class Agent:
    """The agent side: livekit-agents' DataStreamAudioOutput, as AvatarSession sets it up."""

    def __init__(self, hub: Hub, room_name: str, identity: str, avatar_identity: str) -> None:
        self.room = StandInRoom(hub, room_name, identity, kind=AGENT)
        self.avatar_identity = avatar_identity
        self.finished: list = []
        self.started: list = []
        self.output: DataStreamAudioOutput | None = None

    async def connect(self) -> None:
        await self.room.connect()
        self.output = DataStreamAudioOutput(self.room, destination_identity=self.avatar_identity, sample_rate=RATE,
                                            wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True)
        self.output.on("playback_finished", self.finished.append)
        self.output.on("playback_started", self.started.append)

    async def say(self, pcm: np.ndarray, chunk: int = 480) -> None:
        """Send one utterance (TTS pushes faster than real time) and close it."""
        for i in range(0, len(pcm), chunk):
            part = pcm[i:i + chunk]
            await self.output.capture_frame(rtc.AudioFrame(part.tobytes(), RATE, 1, len(part)))
        self.output.flush()

    async def wait_finished(self, count: int, timeout: float = 30) -> None:
        t0 = time.monotonic()
        while len(self.finished) < count:
            assert time.monotonic() - t0 < timeout, f"no playback_finished #{count} (got {self.finished})"
            await asyncio.sleep(0.02)


class AudioTap:
    """Reads a published local audio track back (real livekit AudioStream), keeps non-silent samples."""

    def __init__(self, track: rtc.LocalAudioTrack) -> None:
        self.stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
        self.chunks: list[tuple[float, np.ndarray]] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for ev in self.stream:
            self.chunks.append((time.monotonic(), np.frombuffer(ev.frame.data, dtype=np.int16).copy()))

    def voiced(self) -> np.ndarray:
        x = np.concatenate([c for _, c in self.chunks]) if self.chunks else np.zeros(0, np.int16)
        return x[x != 0]   # the track plays silence whenever nothing is queued

    async def close(self) -> None:
        self.task.cancel()
        await self.stream.aclose()


async def agent_and_worker(host, avatar, room: str, agent_id: str):
    """A worker serving `room` for an agent that has connected; the worker's audio track read back."""
    hub = Hub()
    worker = Worker(hub, host, avatar, room, agent_id)
    agent = Agent(hub, room, agent_id, worker.info.avatar_identity)
    await agent.connect()
    await asyncio.wait_for(worker.started.wait(), 20)
    audio_track, _ = await worker.published()
    return worker, agent, AudioTap(audio_track)


async def test_agent_audio_comes_back_sample_exact_with_video_at_model_fps(host, avatar):
    worker, agent, tap = await agent_and_worker(host, avatar, "room-a", "agent-a")
    assert worker.runner._options.video_fps == host.fps == FPS

    first, second = tts_audio(0.62, 1), tts_audio(0.45, 2)   # not whole frames: the tail is flushed too
    await agent.say(first)
    await agent.wait_finished(1)
    await agent.say(second)
    await agent.wait_finished(2)
    await asyncio.sleep(0.3)   # the last 100 ms queued in the audio source play out

    # one playback_finished per utterance, at the utterance's exact duration, not interrupted
    assert [e.interrupted for e in agent.finished] == [False, False]
    assert len(agent.started) == 2                  # lk.playback_started once per utterance, from the worker
    assert agent.finished[0].playback_position == pytest.approx(len(first) / RATE, abs=1e-6)
    assert agent.finished[1].playback_position == pytest.approx(len(second) / RATE, abs=1e-6)

    # the room hears exactly what the agent sent (silence between utterances aside)
    sent = np.concatenate([first, second])
    heard = tap.voiced()
    assert len(heard) == len(sent)
    assert np.array_equal(heard, sent)

    # video on the model's 25 fps timeline: one video frame per 40 ms of audio, audio after its frame
    trace = list(worker.generator.trace)
    speech_video = [i for i, (kind, speech) in enumerate(trace) if kind == "video" and speech]
    assert len(speech_video) == -(-len(first) // SPF) + -(-len(second) // SPF)
    audio_items = [i for i, (kind, _) in enumerate(trace) if kind == "audio"]
    assert all(trace[i - 1][0] == "video" for i in audio_items)   # each audio chunk follows its frame
    assert [k for k, _ in trace].count("end") == 2
    assert worker.runner.av_sync.actual_fps > 0

    await tap.close()
    await worker.stop()
    assert host.free_slots == host.capacity


async def test_clear_buffer_stops_audio_and_mouth_and_reports_interrupted(host, avatar):
    worker, agent, tap = await agent_and_worker(host, avatar, "room-b", "agent-b")

    long = tts_audio(4.0, 3)
    await agent.say(long)
    t0 = time.monotonic()
    while len(tap.voiced()) < RATE // 2:              # half a second is playing
        assert time.monotonic() - t0 < 20
        await asyncio.sleep(0.01)
    trace = worker.generator.trace
    t_clear = time.monotonic()
    agent.output.clear_buffer()                        # the agent was interrupted: lk.clear_buffer RPC
    await agent.wait_finished(1)
    t_reported = time.monotonic() - t_clear
    await asyncio.sleep(0.5)

    event = agent.finished[0]
    assert event.interrupted
    assert 0.4 < event.playback_position < 4.0 - 1.0
    # after the clear reached the generator: no more agent audio, and at most 100 ms of speaking frames
    cut = worker.generator.cleared_at_trace[0]
    after = list(trace)[cut:]
    assert not [k for k, s in after if k == "audio"]
    assert sum(1 for k, s in after if k == "video" and s) <= 0.1 * FPS
    assert any(k == "video" and not s for k, s in after)          # idle frames go on
    # the room heard at most 100 ms more than the position the worker reported
    heard = tap.voiced()
    assert np.array_equal(heard, long[:len(heard)])
    assert len(heard) / RATE <= event.playback_position + 0.1
    last_voiced = max((t for t, c in tap.chunks if c.any()), default=t_clear)
    print(json.dumps({"clear_to_playback_finished_ms": round(1000 * t_reported, 1),
                      "clear_to_last_audio_ms": round(1000 * (last_voiced - t_clear), 1)}))

    await tap.close()
    await worker.stop()


async def test_one_failing_session_leaves_the_others_running(host, avatar):
    hub = Hub()
    good = Worker(hub, host, avatar, "room-good", "agent-good")
    bad = Worker(hub, host, avatar, "room-bad", "agent-bad")
    good_agent = Agent(hub, "room-good", "agent-good", good.info.avatar_identity)
    bad_agent = Agent(hub, "room-bad", "agent-bad", bad.info.avatar_identity)
    await good_agent.connect()
    await bad_agent.connect()
    await asyncio.wait_for(asyncio.gather(good.started.wait(), bad.started.wait()), 20)
    assert host.free_slots == host.capacity - 2

    # a malformed audio stream (no sample_rate attribute): the library's receiver fails that job
    writer = await bad_agent.room.local_participant.stream_bytes(
        "AUDIO_x", topic="lk.audio_stream", destination_identities=[bad.info.avatar_identity], attributes={})
    await writer.write(b"\x01\x00" * 960)
    await writer.aclose()
    with pytest.raises(ValueError, match="sample_rate"):
        await asyncio.wait_for(bad.done, 20)
    bad.thread.close()
    assert host.free_slots == host.capacity - 1          # its slot is back; the good one keeps its own

    utterance = tts_audio(0.5, 4)
    await good_agent.say(utterance)
    await good_agent.wait_finished(1)
    assert good_agent.finished[0].playback_position == pytest.approx(len(utterance) / RATE, abs=1e-6)
    await good.stop()
    assert host.free_slots == host.capacity


async def test_full_worker_turns_a_job_down(host):
    from livekit.agents import JobRequest
    from livekit.protocol import agent as agent_proto
    from livekit.protocol import models

    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig

    worker = AvatarWorker(host, WorkerConfig(agent_name="emo-stream"))
    server = worker.build_server()                       # the real AgentServer, not started
    assert server._job_executor_type.name == "THREAD"

    answers: list = []

    async def on_reject(terminate: bool) -> None:
        answers.append(("reject", terminate))

    async def on_accept(args) -> None:
        answers.append(("accept", args.identity, dict(args.attributes or {})))

    def request(n: int) -> JobRequest:
        info = DispatchInfo(avatar_identity=f"avatar-{n}", sender_identity=f"agent-{n}")
        job = agent_proto.Job(id=f"job-{n}", room=models.Room(name=f"room-{n}", sid=f"RM_{n}"),
                              metadata=info.to_json(), agent_name="emo-stream")
        return JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)

    taken = []
    while host.free_slots > 1:                          # other rooms hold all slots but one
        assert host.reserve()
        taken.append(1)
    try:
        await worker.on_request(request(1))
        assert answers[-1] == ("accept", "avatar-1", {"lk.publish_on_behalf": "agent-1"})
        assert host.load == 1.0 and server._load_fnc() == 1.0
        await worker.on_request(request(2))
        assert answers[-1] == ("reject", False)         # declined, not terminated: LiveKit tries another worker
        bad = agent_proto.Job(id="job-3", room=models.Room(name="room-3"), metadata="not json")
        await worker.on_request(JobRequest(job=bad, on_reject=on_reject, on_accept=on_accept))
        assert answers[-1] == ("reject", True)
    finally:
        for _ in taken:
            host.release()
        host.release()                                   # job-1's reservation (its job never launched)
    assert host.load == 0.0


async def test_avatar_session_dispatches_the_worker_and_routes_the_agent_audio(host, avatar, monkeypatch):
    """The agent author's side: AvatarSession(avatar=...).start(agent_session, room=...) dispatches the
    worker with the portrait in the metadata and replaces the agent's audio output; the worker accepts the
    dispatch, joins, publishes, and the agent's speech plays back through it."""
    from types import SimpleNamespace

    from livekit.agents import JobRequest
    from livekit.protocol import agent as agent_proto
    from livekit.protocol import models

    import emo_stream.livekit.plugin as plugin
    from emo_stream.livekit import AvatarSession
    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig
    from emo_stream.default_avatar import default_portrait

    dispatched = []

    class FakeAPI:   # LiveKit's server API: records the dispatch instead of calling a server
        def __init__(self, url, key, secret):
            self.agent_dispatch = SimpleNamespace(create_dispatch=self.create_dispatch)

        async def create_dispatch(self, request):
            dispatched.append(request)
            return SimpleNamespace(id="AD_1")

        async def aclose(self):
            pass

    monkeypatch.setattr(plugin.api, "LiveKitAPI", FakeAPI)

    class AgentSessionStandIn(rtc.EventEmitter):
        def __init__(self):
            super().__init__()
            self.output = SimpleNamespace(audio=None)

    hub = Hub()
    agent_room = StandInRoom(hub, "room-p", "agent-p", kind=AGENT)
    await agent_room.connect()
    agent_session = AgentSessionStandIn()
    session = AvatarSession(avatar=default_portrait(256), seed=7)
    await session.start(agent_session, room=agent_room, livekit_url="ws://x", livekit_api_key="k",
                        livekit_api_secret="s")

    assert isinstance(agent_session.output.audio, DataStreamAudioOutput)
    (request,) = dispatched
    assert request.agent_name == "emo-stream" and request.room == "room-p"
    info = DispatchInfo.from_json(request.metadata)
    assert (info.avatar_identity, info.sender_identity, info.seed) == (session.avatar_identity, "agent-p", 7)
    assert info.image_b64 and info.mode == "agent"

    # the worker's side of the dispatch
    worker = AvatarWorker(host, WorkerConfig())
    accepted = []

    async def on_accept(args):
        accepted.append(args)

    job = agent_proto.Job(id="job-p", room=models.Room(name="room-p"), metadata=request.metadata)
    await worker.on_request(JobRequest(job=job, on_reject=None, on_accept=on_accept))
    assert accepted[0].identity == session.avatar_identity
    assert accepted[0].attributes == {"lk.publish_on_behalf": "agent-p"}
    prepared = await worker.avatar_for(info)                   # the portrait from the metadata
    assert prepared.image_shape[:2] == (256, 256)
    job_run = Worker(hub, host, prepared, "room-p", "agent-p", info=info, reserved=True)
    await asyncio.wait_for(job_run.started.wait(), 20)
    await session.wait_for_join(timeout=10)                    # the base class sees the avatar's video

    finished = []
    agent_session.output.audio.on("playback_finished", finished.append)
    pcm = tts_audio(0.3, 5)
    await agent_session.output.audio.capture_frame(rtc.AudioFrame(pcm.tobytes(), RATE, 1, len(pcm)))
    agent_session.output.audio.flush()
    t0 = time.monotonic()
    while not finished:
        assert time.monotonic() - t0 < 20
        await asyncio.sleep(0.02)
    assert finished[0].playback_position == pytest.approx(len(pcm) / RATE, abs=1e-6)

    # the worker dies in the middle of an utterance: the agent's playout ends (interrupted) instead of
    # waiting forever, and the avatar is dispatched again; a new worker joins under the same identity
    long = tts_audio(3.0, 6)
    await agent_session.output.audio.capture_frame(rtc.AudioFrame(long.tobytes(), RATE, 1, len(long)))
    agent_session.output.audio.flush()
    await asyncio.sleep(0.5)
    await job_run.stop()                                      # the avatar participant leaves the room
    t0 = time.monotonic()
    while len(finished) < 2 or len(dispatched) < 2:
        assert time.monotonic() - t0 < 20, (finished, dispatched)
        await asyncio.sleep(0.02)
    assert finished[1].interrupted
    assert dispatched[1].metadata == request.metadata         # same portrait, seed and identity
    assert host.reserve()
    replacement = Worker(hub, host, prepared, "room-p", "agent-p", info=info, reserved=True)
    await asyncio.wait_for(replacement.started.wait(), 20)
    pcm = tts_audio(0.3, 7)
    await agent_session.output.audio.capture_frame(rtc.AudioFrame(pcm.tobytes(), RATE, 1, len(pcm)))
    agent_session.output.audio.flush()
    t0 = time.monotonic()
    while len(finished) < 3:
        assert time.monotonic() - t0 < 20
        await asyncio.sleep(0.02)
    assert finished[2].playback_position == pytest.approx(len(pcm) / RATE, abs=1e-6)
    assert not finished[2].interrupted
    await session.aclose()
    await replacement.stop()
    assert len(dispatched) == 2                               # closing the session does not re-dispatch


async def test_talk_mode_animates_a_participants_microphone(host, avatar):
    """Talk mode (no agent): the worker subscribes to a participant's microphone and publishes the
    avatar speaking it."""
    hub = Hub()
    user = StandInRoom(hub, "room-t", "user-t")
    await user.connect()
    mic = rtc.AudioSource(48000, 1)
    await user.local_participant.publish_track(rtc.LocalAudioTrack.create_audio_track("mic", mic))
    info = DispatchInfo(avatar_identity="avatar-t", mode="talk", sender_identity="user-t", sample_rate=RATE)
    worker = Worker(hub, host, avatar, "room-t", "user-t", info=info)
    await asyncio.wait_for(worker.started.wait(), 20)
    audio_track, _ = await worker.published()
    tap = AudioTap(audio_track)
    t = np.arange(4800) / 48000
    for _ in range(15):                                  # 1.5 s of a 300 Hz tone, in real time
        await mic.capture_frame(rtc.AudioFrame((6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16).tobytes(),
                                               48000, 1, 4800))
    t0 = time.monotonic()
    while len(tap.voiced()) < RATE // 2:
        assert time.monotonic() - t0 < 20, "the microphone never came back out of the avatar"
        await asyncio.sleep(0.02)
    heard = tap.voiced().astype(np.float64)[:RATE // 2]
    spectrum = np.abs(np.fft.rfft(heard - heard.mean()))
    assert abs(np.argmax(spectrum) * 2 - 300) <= 20      # it is the tone (2 Hz bins), resampled 48 -> 24 kHz
    assert sum(1 for k, s in worker.generator.trace if k == "video" and s) > 10
    await tap.close()
    await worker.stop()
    await user.disconnect()
    await mic.aclose()


def test_worker_command_errors_are_one_line(monkeypatch, capsys):
    from server.cli import main

    for key in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(key, raising=False)
    assert main(["worker"]) == 2
    err = capsys.readouterr().err.strip()
    assert "LIVEKIT_URL" in err and "LIVEKIT_API_SECRET" in err and len(err.splitlines()) == 1
    assert main(["worker", "--url", "ws://127.0.0.1:9", "--api-key", "k", "--api-secret", "s",
                 "--avatar", "noequals"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["worker", "--url", "ws://127.0.0.1:9", "--api-key", "k", "--api-secret", "s",
                 "--default-avatar", "/no/such.jpg"]) == 2
    assert "/no/such.jpg" in capsys.readouterr().err


@pytest.mark.slow   # ~20 s on the shared box: the process start (torch, livekit) and its exit dominate
def test_worker_drains_and_exits_on_sigterm(tmp_path):
    """The real command: it starts the engine and livekit-agents' AgentServer (the server address is a
    closed loopback port, so it keeps retrying), and SIGTERM drains it and exits 0."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker", "--url", "ws://127.0.0.1:9",
                             "--api-key", "devkey", "--api-secret", "secret" * 6, "--http-port", "0",
                             "--size", "64", "--max-sessions", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "emo-stream worker:" in line:
                break
        assert any("2 rooms at most" in line for line in lines), "".join(lines)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "draining" in out


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_worker_that_cannot_connect_says_where_and_why_in_one_line(host, caplog):
    """A closed loopback port: the first failure is one line of ours naming the URL (no token) and the cause,
    the library's own "retrying in 10s" line is not printed, and after --max-retry retries serve() gives up."""
    import logging

    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig, WorkerConnectionError

    port = _closed_port()
    url = f"ws://127.0.0.1:{port}/?access_token=tok-{'x' * 20}"
    worker = AvatarWorker(host, WorkerConfig(url=url, api_key="devkey", api_secret="s3cret" * 6, http_port=0,
                                             max_retry=1))
    caplog.set_level(logging.INFO)
    with pytest.raises(WorkerConnectionError) as gave_up:
        await asyncio.wait_for(worker.serve(), 60)
    ours = [r.getMessage() for r in caplog.records if r.name == "emo_stream.livekit.worker" and "LiveKit" in r.getMessage()]
    assert ours == [f"cannot connect to LiveKit at ws://127.0.0.1:{port}/: Connection refused; retrying "
                    "(1 more attempts, --max-retry)"]
    assert str(gave_up.value).startswith(f"could not connect to LiveKit at ws://127.0.0.1:{port}/ after 2 attempts: "
                                         "Connection refused")
    text = caplog.text + str(gave_up.value)
    assert "failed to connect to livekit" not in text and "Traceback" not in text
    assert "tok-" not in text and "s3cret" not in text


@pytest.mark.slow   # ~15 s: the process start (torch, livekit) dominates
def test_worker_command_max_retry_exits_with_one_line():
    import os
    import subprocess
    import sys

    port = _closed_port()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "worker", "--url", f"ws://127.0.0.1:{port}",
                           "--api-key", "devkey", "--api-secret", "secret" * 6, "--http-port", "0", "--size", "64",
                           "--backend", "synctest", "--max-retry", "0"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"emo-stream worker: error: could not connect to LiveKit at ws://127.0.0.1:{port} after 1 attempt: "
                      "Connection refused (check the URL and that the server is up; --max-retry sets the attempts)"]


async def test_generator_resamples_audio_at_another_rate(host, avatar):
    """An agent sending another rate than announced (or stereo) is still published, resampled to the
    announced rate and mixed to mono; the engine still gets every utterance and its end."""
    from livekit.agents.voice.avatar import AudioSegmentEnd

    from emo_stream.livekit.generator import EngineVideoGenerator

    assert host.reserve()
    session = host.open_session(avatar)
    try:
        gen = EngineVideoGenerator(session, fps=FPS, sample_rate=RATE)
        gen.trace = __import__("collections").deque()
        t = np.arange(48000) / 48000                                  # 1 s, 48 kHz stereo
        stereo = np.repeat((8000 * np.sin(2 * np.pi * 200 * t)).astype(np.int16)[:, None], 2, axis=1)
        for i in range(0, 48000, 4800):
            part = stereo[i:i + 4800]
            await gen.push_audio(rtc.AudioFrame(part.tobytes(), 48000, 2, len(part)))
        await gen.push_audio(AudioSegmentEnd())
        out, ended = [], False
        async for item in gen:
            if isinstance(item, rtc.AudioFrame):
                assert (item.sample_rate, item.num_channels) == (RATE, 1)
                out.append(np.frombuffer(item.data, dtype=np.int16))
            elif isinstance(item, AudioSegmentEnd):
                ended = True
                break
        assert ended
        audio = np.concatenate(out)
        assert abs(len(audio) - RATE) <= 0.01 * RATE                 # 1 s at 24 kHz
        spectrum = np.abs(np.fft.rfft(audio[:RATE // 2].astype(np.float64)))
        assert abs(np.argmax(spectrum) * 2 - 200) <= 4
    finally:
        await session.close()
        host.release()


class JobContextStandIn:
    """What AvatarWorker.entrypoint uses of livekit-agents' JobContext."""

    def __init__(self, job, room: StandInRoom) -> None:
        self.job = job
        self.room = room
        self.reasons: list[str] = []

    async def connect(self, auto_subscribe=None) -> None:
        await self.room.connect()

    def shutdown(self, reason: str = "") -> None:
        self.reasons.append(reason)


async def test_worker_entrypoint_serves_a_dispatched_room_and_frees_its_slot(host):
    from livekit.agents import JobRequest
    from livekit.protocol import agent as agent_proto
    from livekit.protocol import models

    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig

    worker = AvatarWorker(host, WorkerConfig())

    async def accept(args):
        pass

    def dispatch(job_id: str, info: DispatchInfo):
        job = agent_proto.Job(id=job_id, room=models.Room(name=f"room-{job_id}"), metadata=info.to_json())
        return job, JobRequest(job=job, on_reject=None, on_accept=accept)

    # a portrait name the worker does not have: the room ends with the reason, the slot comes back
    bad_info = DispatchInfo(avatar_identity="avatar-e1", sender_identity="agent-e1", avatar="nobody")
    job, request = dispatch("e1", bad_info)
    await worker.on_request(request)
    assert host.free_slots == host.capacity - 1
    ctx = JobContextStandIn(job, StandInRoom(Hub(), "room-e1", "avatar-e1", kind=AGENT))
    thread = LoopThread("job-e1")
    await thread.submit(worker.entrypoint(ctx))
    thread.close()
    assert "unknown avatar 'nobody'" in ctx.reasons[0]
    assert host.free_slots == host.capacity and not worker._senders

    # a good dispatch: the job thread serves the agent until it leaves
    hub = Hub()
    info = DispatchInfo(avatar_identity="avatar-e2", sender_identity="agent-e2", sample_rate=RATE, seed=5)
    job, request = dispatch("e2", info)
    await worker.on_request(request)
    agent = Agent(hub, "room-e2", "agent-e2", "avatar-e2")
    await agent.connect()
    ctx = JobContextStandIn(job, StandInRoom(hub, "room-e2", "avatar-e2", kind=AGENT))
    thread = LoopThread("job-e2")
    running = thread.submit(worker.entrypoint(ctx))
    pcm = tts_audio(0.4, 8)
    await agent.say(pcm)
    await agent.wait_finished(1)
    assert agent.finished[0].playback_position == pytest.approx(len(pcm) / RATE, abs=1e-6)
    assert host.free_slots == host.capacity - 1 and worker._senders == {"agent-e2"}
    await agent.room.disconnect()                              # the agent leaves: the avatar follows
    await asyncio.wait_for(running, 20)
    thread.close()
    assert ctx.reasons == ["avatar finished"]
    assert host.free_slots == host.capacity and not worker._senders


async def test_a_portrait_is_loaded_and_prepared_once_per_worker(host):
    from emo_stream.livekit.metadata import encode_image
    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig
    from emo_stream.default_avatar import default_portrait

    worker = AvatarWorker(host, WorkerConfig())
    loads = []
    original = worker._load_image

    def counting(info):
        loads.append(info.image_key())
        return original(info)

    worker._load_image = counting
    b64 = encode_image(default_portrait(200))
    first = DispatchInfo(avatar_identity="a1", image_b64=b64, seed=1)
    second = DispatchInfo(avatar_identity="a2", image_b64=b64, seed=2)   # another room, same portrait
    h1, h2 = await asyncio.gather(worker.avatar_for(first), worker.avatar_for(second))
    h3 = await worker.avatar_for(first)
    assert h1 == h2 == h3
    assert len(loads) <= 2 and len(set(loads)) == 1      # concurrent first requests may both decode
    await worker.avatar_for(first)
    assert len(loads) <= 2                               # later rooms: no decoding, no preparation
