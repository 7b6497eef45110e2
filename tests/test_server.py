"""Server configuration, HTTP routes, auth and the serve command (with a tiny stand-in engine: no backend)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest

from emo_stream.errors import ConfigError
from server.app import StreamServer
from server.config import ServerConfig, load_config
from server.protocol import ProtocolError, decode_frame, encode_frame, parse_message


# -- a stand-in engine with the emo_stream.streaming API (idle frames only) ---------------------------

@dataclass
class _Frame:
    index: int
    image: np.ndarray
    audio: np.ndarray
    speech: bool = False
    segment_end: bool = False


class _Session:
    def __init__(self, n: int):
        self.id = f"fake{n}"
        self._closed = asyncio.Event()

    async def frames(self):
        k = 0
        while not self._closed.is_set():
            yield _Frame(k, np.full((16, 16, 3), 7, np.uint8), np.zeros(640, np.float32))
            k += 1
            await asyncio.sleep(0.04)

    async def push_audio(self, pcm, sample_rate=16000, channels=1, timestamp=None):
        pass

    def end_of_speech(self):
        pass

    def clear(self):
        pass

    def stats(self):
        return {"latency_ms": {"p50": 1.0, "p95": 2.0}, "input_queue_s": 0.0, "state": "idle"}

    input_backlog_s = 0.0
    output_queue_frames = 0

    async def close(self):
        self._closed.set()


class _Avatars:
    """The engine's avatar cache as the server uses it (per-owner quota; nothing is prepared here)."""

    max_per_owner = None

    def claim(self, avatar_id, owner):
        pass

    def has_room(self, owner):
        return True

    def release(self, owner):
        pass


class FakeEngine:
    class backend:
        name = "fake"

    def __init__(self):
        self.n = 0
        self.avatars = _Avatars()

    async def start(self):
        pass

    async def stop(self):
        pass

    async def prepare_avatar(self, image):
        return object()

    def open_session(self, avatar, seed=0):
        self.n += 1
        return _Session(self.n)


async def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    def fetch():
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(fetch)


@pytest.fixture
async def server():
    srv = StreamServer(load_config(None, port=0, size=64), engine=FakeEngine())
    await srv.start()
    yield srv
    await srv.stop()


# -- config ---------------------------------------------------------------------------------------

def test_default_config_file_loads_into_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, ServerConfig)
    assert cfg.host == "127.0.0.1" and cfg.port == 8080 and cfg.backend is None  # preview with a notice, unless a model is set
    # max_sessions empty: the capacity comes from the device's memory at start (4 on a CPU)
    assert cfg.sessions.max_sessions is None and cfg.playout.video_queue_frames >= 1
    assert not cfg.auth_required


def test_overrides_and_model_implies_emo(tmp_path):
    cfg = load_config(None, port=9000, model="tiny")
    assert cfg.port == 9000 and cfg.backend == "emo" and cfg.model == "tiny"
    path = tmp_path / "s.yaml"
    path.write_text("port: 1234\nsessions:\n  max_sessions: 7\n")
    cfg = load_config(path)
    assert cfg.port == 1234 and cfg.sessions.max_sessions == 7 and cfg.sessions.idle_timeout_s == 300


@pytest.mark.parametrize("text, words", [
    ("portt: 1\n", "unknown keys ['portt']"),
    ("sessions:\n  max_session: 2\n", "unknown keys in 'sessions': ['max_session']"),
    ("port: eighty\n", "port must be int"),
    ("sessions:\n  max_sessions: 0\n", "must be positive"),
    ("backend: magic\n", "backend must be one of preview, emo"),
    ("fps: 24\n", "fps must divide"),
    ("size: 17\n", "size must be an even number"),
    ("sessions: [1, 2]\n", "sessions must be a mapping"),
    ("port: [\n", "not valid YAML"),
    ("token: short\n", "token is too weak"),
    ("token: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", "at least 128"),
])
def test_bad_config_is_a_config_error(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_binding_beyond_loopback_requires_a_token():
    cfg = load_config(None, host="0.0.0.0")
    assert cfg.auth_required
    cfg.ensure_token()
    assert cfg.token and len(cfg.token) >= 16
    assert not load_config(None, host="::1").auth_required


def test_serve_command_reports_bad_config(tmp_path, capsys):
    from server.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("port: -1\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "port must be positive" in capsys.readouterr().err


def test_a_serve_process_that_exits_is_reported_with_its_output(tmp_path):
    """start_serve_process (benchmarks and browser tests) gives up as soon as `serve` exits, saying why."""
    from pathlib import Path

    from server.serve_process import ServerDidNotStart, start_serve_process

    path = tmp_path / "bad.yaml"
    path.write_text("port: -1\n")
    with pytest.raises(ServerDidNotStart, match=r"(?s)did not start \(exit code 2\).*port must be positive"):
        start_serve_process(["--config", str(path)], repo=Path(__file__).resolve().parents[1], timeout=60)


def test_a_serve_process_that_hangs_silently_times_out(tmp_path):
    """A server stuck before it prints anything (a model load that never returns) is given up on after
    `timeout`: waiting for its next line of output must not block past it."""
    import time

    from server.serve_process import ServerDidNotStart, start_serve_process

    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("")
    (tmp_path / "server" / "cli.py").write_text("import time\ntime.sleep(60)\n")
    t0 = time.monotonic()
    with pytest.raises(ServerDidNotStart, match=r"no URL within 1 s"):
        start_serve_process([], repo=tmp_path, timeout=1.0)
    assert time.monotonic() - t0 < 20


# -- protocol -------------------------------------------------------------------------------------

def test_frame_messages_round_trip():
    data = encode_frame({"type": "frame", "index": 3, "pts": 0.12}, b"\xff\xd8jpeg", b"\x01\x00" * 640)
    header, jpeg, pcm = decode_frame(data)
    assert header["index"] == 3 and header["jpeg_bytes"] == 6 and jpeg == b"\xff\xd8jpeg" and len(pcm) == 1280


def test_start_defaults_and_validation():
    msg = parse_message('{"type": "start"}', 65536, 1 << 20)
    assert msg.audio.sample_rate == 16000 and msg.audio.channels == 1 and msg.frames == "none"
    with pytest.raises(ProtocolError, match="either audio"):
        parse_message('{"type": "start", "audio": {"sample_rate": 16000}, "webrtc": {"type": "offer", "sdp": "v=0"}}',
                      65536, 1 << 20)
    with pytest.raises(ProtocolError, match="not an SDP offer"):
        parse_message('{"type": "view", "session": "x", "webrtc": {"type": "offer", "sdp": "hello"}}', 65536, 1 << 20)
    with pytest.raises(ProtocolError, match="avatar size"):
        parse_message('{"type": "avatar", "content_type": "image/png", "size": 99999999}', 65536, 1 << 20)
    with pytest.raises(ProtocolError, match="must be int"):
        parse_message('{"type": "start", "seed": true}', 65536, 1 << 20)


# -- HTTP -----------------------------------------------------------------------------------------

async def test_pages_static_files_and_health(server):
    status, headers, body = await _get(server.base_url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for element in ('<button id="start"', '<button id="stop"', '<video id="avatar"'):
        assert element in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, _, body = await _get(server.base_url + "/viewer?session=abc")
    assert status == 200 and b'<video id="avatar"' in body
    status, headers, _ = await _get(server.base_url + "/static/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    for bad in ("/static/../server/config.py", "/static/.hidden", "/static/", "/nope", "/static/%2e%2e/pyproject.toml"):
        assert (await _get(server.base_url + bad))[0] == 404, bad
    status, headers, body = await _get(server.base_url + "/healthz")
    health = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert health["status"] == "ok" and health["backend"] == "fake" and health["sessions"] == 0
    status, _, body = await _get(server.base_url + "/api/sessions")
    assert json.loads(body) == {"sessions": []}
    assert (await _get(server.base_url + "/api/sessions/nope"))[0] == 404


async def test_cross_site_websocket_is_refused(server):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as exc:
        async with connect(server.base_url.replace("http", "ws") + "/api/ws", origin="http://evil.example"):
            pass
    assert exc.value.response.status_code == 403
    async with connect(server.base_url.replace("http", "ws") + "/api/ws", origin=server.base_url) as ws:
        await ws.send('{"type": "ping"}')
        assert json.loads(await ws.recv())["type"] == "pong"



async def test_a_header_given_twice_is_a_bad_request():
    """Two Authorization (or Origin) headers are ambiguous: 400, not a server error or a guess.
    One, with the scheme in any case, is read as usual."""
    srv = StreamServer(load_config(None, port=0, size=64, token="secret-token-0123456789abcdef"), engine=FakeEngine())
    await srv.start()

    async def status_of(headers: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write((f"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n{headers}Upgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return int(line.split()[1])

    try:
        good = "Authorization: Bearer secret-token-0123456789abcdef\r\n"
        assert await status_of(good + "Authorization: Bearer wrong-token-456\r\n") == 400
        assert await status_of(good + "Origin: http://evil.example\r\nOrigin: http://evil2.example\r\n") == 400
        assert await status_of("Authorization: Bearer wrong-token-456\r\n") == 401
        assert await status_of(good) == 101
        assert await status_of("Authorization: bearer secret-token-0123456789abcdef\r\n") == 101
    finally:
        await srv.stop()

async def test_session_stats_and_cleanup_on_disconnect(server):
    from server.bot_client import BotClient

    bot = BotClient(server.base_url)
    await bot.connect()
    info = await bot.start(frames="none")
    status, _, body = await _get(f"{server.base_url}/api/sessions/{info['session']}")
    stats = json.loads(body)
    assert status == 200 and stats["kind"] == "ws" and stats["latency_ms"]["p95"] == 2.0 and "playout" in stats
    await bot.close()
    for _ in range(40):
        if len(server.sessions) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(server.sessions) == 0


async def test_virtual_camera_skips_cleanly_without_a_device(caplog):
    srv = StreamServer(load_config(None, port=0, size=64), engine=FakeEngine(), virtual_camera=True)
    with caplog.at_level("WARNING", logger="server.virtual_camera"):
        await srv.start()
    try:
        if srv._camera is None:  # no pyvirtualcam or no camera device here: said so, and serving anyway
            assert "--virtual-camera" in caplog.text and "continuing without" in caplog.text
        status, _, _ = await _get(srv.base_url + "/healthz")
        assert status == 200
    finally:
        await srv.stop()


async def test_unusable_sdp_offer_is_a_clear_error_and_frees_the_slot(server):
    """One error with a reason; no session_ended for a session the client never heard start."""
    from websockets.asyncio.client import connect

    from server.bot_client import BotClient, BotError

    async with connect(server.base_url.replace("http", "ws") + "/api/ws") as ws:
        await ws.send(json.dumps({"type": "start", "webrtc": {"type": "offer", "sdp": "v=0\r\nm=nonsense\r\n"}}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "error" and first["request"] == "start", first
        assert "cannot use this SDP offer (malformed SDP" in first["message"] and ": )" not in first["message"]
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "pong"  # nothing else came between
    async with BotClient(server.base_url) as bot:
        with pytest.raises(BotError, match="cannot use this SDP offer"):
            await bot.request({"type": "start", "webrtc": {"type": "offer", "sdp": "v=0\r\nm=nonsense\r\n"}})
        assert len(server.sessions) == 0
        with pytest.raises(BotError, match="no such session"):
            await bot.request({"type": "view", "session": "latest", "webrtc": {"type": "offer", "sdp": "v=0\r\n"}})
        assert (await bot.request({"type": "ping"}))["type"] == "pong"


async def test_a_refused_view_offer_leaves_nothing_behind(server):
    """A parseable offer the answer cannot use (no audio m-line): a clear error, the viewer count and the
    loop stay clean (the closed peer connection must not call back into a view that never existed)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    from server.bot_client import BotClient, BotError

    loop_errors = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"type": "offer", "sdp": pc.localDescription.sdp}
        async with BotClient(server.base_url) as owner, BotClient(server.base_url) as viewer:
            info = await owner.start(frames="none")
            for _ in range(3):
                with pytest.raises(BotError, match="cannot use this SDP offer.*no audio section"):
                    await viewer.request({"type": "view", "session": info["session"], "webrtc": offer})
            assert (await viewer.request({"type": "ping"}))["type"] == "pong"
            assert server.sessions.get(info["session"]).viewers == 0 and server.health()["viewers"] == 0
        await asyncio.sleep(0.1)  # let callbacks of the closed peer connections run
        assert not loop_errors, loop_errors
    finally:
        loop.set_exception_handler(None)
        await pc.close()



async def test_a_connection_viewing_a_session_twice_hears_its_end_once(server):
    from aiortc import RTCConfiguration, RTCPeerConnection

    from server.bot_client import BotClient, BotError

    pcs = []
    async with BotClient(server.base_url) as owner, BotClient(server.base_url) as viewer:
        info = await owner.start(frames="none")
        for _ in range(2):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pcs.append(pc)
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            offer = {"type": "offer", "sdp": pc.localDescription.sdp}
            reply = await viewer.request({"type": "view", "session": info["session"], "webrtc": offer})
            assert reply["type"] == "view_started"
        await owner.stop()
        ended = []
        with pytest.raises(BotError, match="nothing received"):
            async for item in viewer.receive(timeout=1.0):
                if isinstance(item, dict) and item.get("type") == "session_ended":
                    ended.append(item)
        assert [e["session"] for e in ended] == [info["session"]]
        assert server.health()["viewers"] == 0
    for pc in pcs:
        await pc.close()

async def test_https_and_wss_with_a_certificate(tmp_path):
    import shutil
    import ssl
    import subprocess

    from server.bot_client import BotClient

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    srv = StreamServer(load_config(None, port=0, size=64, tls_cert=str(cert), tls_key=str(key)), engine=FakeEngine())
    await srv.start()
    try:
        assert srv.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))

        def fetch():
            with urllib.request.urlopen(srv.base_url + "/healthz", context=ctx, timeout=5) as r:
                return json.loads(r.read())

        assert (await asyncio.to_thread(fetch))["status"] == "ok"
        async with BotClient(srv.base_url, ssl=ctx) as bot:
            info = await bot.start(frames="none")
            assert info["viewer_url"].startswith("https://")
    finally:
        await srv.stop()
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, tls_cert=str(cert))


async def test_virtual_camera_follows_the_latest_session(monkeypatch):
    """With a stand-in pyvirtualcam: frames of the newest session reach the camera at its size."""
    import sys
    import types

    sent = []

    class Camera:
        def __init__(self, width, height, fps):
            self.width, self.height, self.fps, self.device = width, height, fps, "stub"

        def send(self, frame):
            sent.append(frame)

        def sleep_until_next_frame(self):
            import time

            time.sleep(1 / self.fps)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "pyvirtualcam", types.SimpleNamespace(Camera=Camera))
    srv = StreamServer(load_config(None, port=0, size=16), engine=FakeEngine(), virtual_camera=True)
    await srv.start()
    try:
        assert srv._camera is not None
        from server.bot_client import BotClient

        async with BotClient(srv.base_url) as bot:
            await bot.start(frames="none")
            await asyncio.sleep(1.0)
        assert sent[-1].shape == (16, 16, 3) and sent[-1].max() == 7  # the session's frames, not the blank start
    finally:
        await srv.stop()


async def test_delayed_video_track_keeps_every_frame_in_order_and_ends():
    """The lip-alignment delay line hands on each frame once, in order, and ends with the subscription."""
    from aiortc.mediastreams import MediaStreamError

    from server.rtc import PlayoutVideoTrack
    from server.sync import QueueClosed

    class Released:
        def __init__(self, i):
            self.i = i

        def video_frame(self):
            return self.i

    class FakeFrames:
        def __init__(self, n):
            self.items = list(range(n))

        async def get(self):
            await asyncio.sleep(0.005)  # released one by one, like the Playout's clock
            if not self.items:
                raise QueueClosed
            return Released(self.items.pop(0))

    class FakeSub:
        def __init__(self, n):
            self.frames = FakeFrames(n)
            self.closed = False

        def close(self):
            self.closed = True

    sub = FakeSub(12)
    track = PlayoutVideoTrack(sub, delay_s=0.02)
    got = []
    with pytest.raises(MediaStreamError):
        for _ in range(20):
            got.append(await asyncio.wait_for(track.recv(), 5))
    assert got == list(range(12))
    assert sub.closed


def test_mic_jitter_tweak_says_when_aiortc_renamed_its_attribute(caplog):
    from aiortc import RTCPeerConnection

    from server.rtc import _JITTER_ATTR, _set_mic_jitter_buffer

    async def run():
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="recvonly")
        receiver = pc.getTransceivers()[0].receiver
        _set_mic_jitter_buffer(pc, 1)
        assert getattr(receiver, _JITTER_ATTR)._prefetch == 1      # today's aiortc: our buffer is in
        delattr(receiver, _JITTER_ATTR)                            # as if aiortc had renamed it
        with caplog.at_level("WARNING", logger="server.rtc"):
            _set_mic_jitter_buffer(pc, 1)
        await pc.close()

    asyncio.run(run())
    assert "mic_jitter_packets is ignored" in caplog.text


async def test_the_webrtc_stack_is_imported_at_start_not_by_the_first_session(monkeypatch):
    """Imported by the first talk page's start, aiortc and its codecs cost that session 0.2-0.4 s of its first
    frame: the server imports them while starting."""
    import server.app as app

    calls = []
    monkeypatch.setattr(app, "preload_webrtc", lambda: calls.append(1) or True)
    srv = StreamServer(load_config(None, port=0, size=64), engine=FakeEngine())
    await srv.start()
    try:
        assert calls == [1]
    finally:
        await srv.stop()


def test_preloading_webrtc_without_aiortc_is_said_and_not_fatal(monkeypatch, caplog):
    import sys

    import server.app as app

    assert app.preload_webrtc() is True and "server.rtc" in sys.modules
    monkeypatch.setitem(sys.modules, "server.rtc", None)   # import server.rtc -> ImportError
    with caplog.at_level("INFO", logger="server.app"):
        assert app.preload_webrtc() is False
    assert "WebRTC is unavailable" in caplog.text
