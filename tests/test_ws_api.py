"""The WebSocket bot API through the Python client, against a real server (preview backend, tiny frames)."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from emo_stream.media import PORTRAIT_MAX_SIDE
from server.app import StreamServer
from server.bot_client import BotClient, BotError, ReceivedFrame
from server.config import load_config
from server.protocol import decode_frame

SIZE = 64


def test_the_bot_api_url_from_what_a_user_types():
    """server.bot_client and pipecat's RemoteAvatar reach /api/ws from any of these; other schemes are refused
    with the caller's error type."""
    from emo_stream.errors import EmoStreamError
    from emo_stream.server_url import bot_api_url

    assert bot_api_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/api/ws"
    assert bot_api_url("https://gpu-box:8443/") == "wss://gpu-box:8443/api/ws"
    assert bot_api_url("127.0.0.1:8080") == "ws://127.0.0.1:8080/api/ws"
    assert bot_api_url("wss://proxy.example/emo/api/ws?x=1") == "wss://proxy.example/emo/api/ws?x=1"

    class LinkError(EmoStreamError):
        pass

    with pytest.raises(LinkError, match="not an emo-stream server URL: ftp://host"):
        bot_api_url("ftp://host", LinkError)
    for no_host in ("", "http://", "https:///api/ws", "ws://:8080"):   # would fail later, at connect
        with pytest.raises(LinkError, match="not an emo-stream server URL"):
            bot_api_url(no_host, LinkError)
    with pytest.raises(EmoStreamError, match="not an emo-stream server URL"):
        BotClient("file:///etc/passwd")


@pytest.fixture(scope="module")
def backend():
    """One preview backend for the module: its face analyser loads once (servers and engines are per test)."""
    from emo_stream.registry import create_backend

    return create_backend("preview", size=SIZE)


@pytest.fixture
async def server(backend):
    srv = await _server(backend)
    yield srv
    await srv.stop()


async def _server(backend, **over) -> StreamServer:
    cfg = load_config(None, port=0, size=SIZE, backend="preview", **over)
    cfg.engine.vad = False  # the energy detector: no model load per test
    cfg.sessions.max_sessions = 2
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    return srv


async def _get(url: str) -> tuple[int, dict | str]:
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read().decode(), exc.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    return await asyncio.to_thread(fetch)


async def _until(bot: BotClient, want, timeout: float = 20.0) -> list:
    """Everything received up to and including the first item for which want(item) is true."""
    got = []
    async for item in bot.receive(timeout=timeout):
        got.append(item)
        if want(item):
            return got
    raise AssertionError(f"connection ended before the expected message; got {[_kind(i) for i in got][-10:]}")


def _kind(item) -> str:
    return "frame" if isinstance(item, ReceivedFrame) else item.get("type")


def _event(kind: str):
    return lambda item: isinstance(item, dict) and item.get("type") == kind


async def test_audio_in_frames_and_events_out(server, speech_16k):
    async with BotClient(server.base_url) as bot:
        info = await bot.start(sample_rate=16000, frames="jpeg")
        assert info["viewer_url"].endswith(f"/viewer?session={info['session']}")
        assert info["fps"] == 25 and info["size"] == SIZE
        pcm = (speech_16k * 32767).astype(np.int16)
        for i in range(0, len(pcm), 3200):  # 200 ms messages, as fast as the server takes them
            await bot.send_audio(pcm[i:i + 3200])
        await bot.end_segment()
        items = await _until(bot, _event("playback_finished"))
        stats = await bot.stats()
        await bot.stop()

    kinds = [_kind(i) for i in items]
    started = kinds.index("playback_started")
    finished = items[-1]
    assert finished["interrupted"] is False
    speech = [i for i in items if isinstance(i, ReceivedFrame) and i.speech]
    # every speech frame arrives between the two events, in order, with its own slice of the audio
    positions = [n for n, i in enumerate(items) if isinstance(i, ReceivedFrame) and i.speech]
    assert min(positions) > started
    assert [f.index for f in speech] == list(range(speech[0].index, speech[0].index + len(speech)))
    assert speech[-1].segment_end
    n_frames = -(-len(speech_16k) // 640)
    assert len(speech) == n_frames
    assert finished["position"] == pytest.approx(n_frames / 25)
    audio = np.concatenate([f.audio for f in speech])
    assert len(audio) == n_frames * 640
    np.testing.assert_allclose(audio[:len(speech_16k)], speech_16k, atol=2e-3)  # PCM16 rounding only
    # the mouth moves with the speech: frames differ from each other and from idle ones
    images = np.stack([f.image.astype(np.int16) for f in speech])
    assert np.abs(np.diff(images, axis=0)).mean() > 0.5
    assert images.shape[1:] == (SIZE, SIZE, 3)
    assert stats["session"] == info["session"] and stats["audio_in_s"] == pytest.approx(len(speech_16k) / 16000, 0.01)
    assert stats["playout"]["max_av_offset_ms"] < 40


async def test_clear_interrupts_playback(server, speech_16k):
    long = np.tile(speech_16k, 3)
    async with BotClient(server.base_url) as bot:
        await bot.start(frames="jpeg")
        await bot.send_audio(long)
        await bot.end_segment()
        await _until(bot, _event("playback_started"))
        await _until(bot, lambda i: isinstance(i, ReceivedFrame) and i.pts > 0.5)
        await bot.clear()
        items = await _until(bot, _event("playback_finished"))
        assert items[-1]["interrupted"] is True
        assert items[-1]["position"] < len(long) / 16000 / 2
        await _until(bot, _event("cleared"), timeout=2)  # the reply follows the interrupted event
        # after the interrupt the avatar is idle again: frames keep coming, without speech
        after = await _until(bot, lambda i: isinstance(i, ReceivedFrame) and not i.speech)
        assert not any(_event("playback_started")(i) for i in after)
        stats = await bot.stats()
        assert stats["input_queue_s"] == 0


async def test_malformed_messages_get_clear_errors_and_the_session_survives(server):
    async with BotClient(server.base_url) as bot:
        ws = bot.ws

        async def error_for(payload) -> dict:
            await ws.send(payload)
            items = await _until(bot, _event("error"), timeout=5)
            return items[-1]

        assert (await error_for("not json"))["code"] == "bad_message"
        assert (await error_for("[1, 2]"))["code"] == "bad_message"
        assert (await error_for('{"type": "dance"}'))["code"] == "unknown_type"
        err = await error_for('{"type": "start", "audio": {"sample_rate": 16000}, "colour": "red"}')
        assert "unknown field 'colour'" in err["message"] and err["request"] == "start"
        err = await error_for('{"type": "start", "audio": {"sample_rate": 12345}}')
        assert "sample_rate" in err["message"]
        err = await error_for('{"type": "start", "audio": {"sample_rate": "16000"}}')
        assert "must be int" in err["message"]
        assert (await error_for(b"\x00\x01"))["code"] == "bad_state"  # audio before start
        assert (await error_for('{"type": "clear"}'))["code"] == "bad_state"
        assert (await error_for("x" * 70000))["code"] == "too_large"
        assert (await error_for("[" * 50000))["code"] == "bad_message"  # too deep for the JSON parser
        err = await error_for('{"type": "avatar", "content_type": "image/gif", "size": 10}')
        assert err["code"] == "bad_image"
        err = await error_for('{"type": "start", "avatar": "nope"}')
        assert "unknown avatar" in err["message"]

        await bot.start(sample_rate=16000, channels=2, frames="none")
        assert (await error_for(b"\x00\x01"))["code"] == "bad_audio"  # half a stereo sample
        assert (await error_for(b"\x00" * 300000))["code"] == "too_large"
        assert (await error_for('{"type": "start"}'))["code"] == "bad_state"  # one session per connection
        # still alive and well
        assert (await bot.request({"type": "ping"}))["type"] == "pong"
        await bot.send_audio(np.zeros(3200 * 2, np.int16))
        stats = await bot.stats()
        assert stats["audio_in_s"] == pytest.approx(0.2)


async def test_avatar_upload_is_prepared_once(server):
    from PIL import Image

    from emo_stream.default_avatar import default_portrait

    buf = io.BytesIO()
    Image.fromarray(default_portrait(128)).save(buf, format="PNG")
    async with BotClient(server.base_url) as bot:
        first = await bot.upload_avatar(buf.getvalue(), "image/png")
        again = await bot.upload_avatar(buf.getvalue(), "image/png")
        assert first == again
        with pytest.raises(BotError, match="not image/jpeg"):
            await bot.upload_avatar(buf.getvalue(), "image/jpeg")
        with pytest.raises(BotError, match="readable image"):
            await bot.upload_avatar(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "image/png")
        with pytest.raises(BotError, match="too large") as exc:  # a header claiming 20000x20000 pixels
            await bot.upload_avatar(_png_header(20000, 20000), "image/png")
        assert exc.value.code == "bad_image"
        info = await bot.start(avatar=first, frames="jpeg")
        frame = (await _until(bot, lambda i: isinstance(i, ReceivedFrame)))[-1]
        assert frame.image.shape == (SIZE, SIZE, 3)
        assert info["session"]


def _rss_mib() -> float:
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        pytest.skip("no /proc/self/statm: RSS not measurable here")


async def test_an_image_bomb_upload_stalls_no_session_and_its_memory_comes_back(server, monkeypatch):
    """5000x5000 one-bit PNGs (a few KB each, exactly at the 25 MP limit): decoded small in the portrait
    pool's worker process and hashed off the event loop, so another session's frames keep coming; the
    memory is given back."""
    import gc
    import os
    import threading

    from PIL import Image

    import emo_stream.streaming.avatars as engine_avatars

    seen = []  # (what, thread, shape) of the heavy steps in this process

    def spy(what, fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            seen.append((what, threading.current_thread() is threading.main_thread(), getattr(args[0], "shape", None)))
            return result
        return wrapped

    monkeypatch.setattr(engine_avatars, "avatar_key", spy("hash", engine_avatars.avatar_key))
    bombs = []
    for i in range(3):  # different bytes each: no upload is recognised as already prepared
        picture = Image.new("1", (5000, 5000), 1)
        picture.putpixel((i, i), 0)
        buf = io.BytesIO()
        picture.save(buf, format="PNG", optimize=True)
        bombs.append(buf.getvalue())
    assert max(len(b) for b in bombs) < 20_000
    async with BotClient(server.base_url, inbox=10_000) as good, BotClient(server.base_url) as uploader:
        await good.start(frames="jpeg")
        await _until(good, lambda i: isinstance(i, ReceivedFrame) and i.index >= 10)  # playing steadily
        gc.collect()
        rss_before = _rss_mib()

        async def upload_all():
            for bomb in bombs:
                try:
                    await uploader.upload_avatar(bomb, "image/png")
                except BotError as exc:  # a blank picture has no face: that may be the answer, never a crash
                    assert exc.code == "bad_image", exc

        uploads = asyncio.ensure_future(upload_all())
        during = 0
        async for item in good.receive(timeout=30):  # the other session's frames while the uploads run
            during += isinstance(item, ReceivedFrame)
            if uploads.done():
                break
        await uploads
        gc.collect()
        rss_after = _rss_mib()
    assert during >= 3  # it was never frozen for the whole of three uploads
    # every decode ran in the pool's worker process, every hash in a worker thread, at a bounded size
    pool = server.avatars.pool
    assert pool.jobs_done == 3 and pool.last_pids and os.getpid() not in pool.last_pids
    hashes = [x for x in seen if x[0] == "hash"]
    assert len(hashes) == 3 and not any(on_loop for _, on_loop, _ in seen), seen
    assert all(max(shape[:2]) <= PORTRAIT_MAX_SIDE for _, _, shape in hashes), hashes
    # decoding full size used to keep ~180 MiB per upload; bounded decoding and malloc_trim give it back
    assert rss_after - rss_before < 120, (rss_before, rss_after)


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels (a decompression bomb's shape, without the bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


async def test_clear_drops_the_audio_being_fed_under_backpressure(backend):
    """A bot ahead of playback: the message the server is part-way through feeding (waiting for room
    in the engine) goes with clear too; nothing of it plays after `cleared`, and the session goes on."""
    cfg = load_config(None, port=0, size=SIZE, backend="preview")
    cfg.engine.vad = False
    cfg.engine.input_seconds = 0.5  # the engine holds 0.5 s of input + 10 frames: a 2 s message waits
    cfg.engine.output_frames = 10
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    try:
        async with BotClient(srv.base_url) as bot:
            await bot.start(frames="jpeg")
            tone = (np.sin(np.arange(32000) / 10) * 8000).astype(np.int16)
            for _ in range(3):
                await bot.send_audio(tone)
            await _until(bot, _event("playback_started"))
            await bot.ws.send(json.dumps({"type": "clear"}))
            items = await _until(bot, _event("cleared"))
            finished = [i for i in items if _event("playback_finished")(i)]
            assert finished and finished[-1]["interrupted"] is True
            after = []
            async for item in bot.receive(timeout=10):
                after.append(item)
                if sum(isinstance(i, ReceivedFrame) for i in after) >= 25:  # a second of playout
                    break
            assert not any(isinstance(i, ReceivedFrame) and i.speech for i in after)
            assert not any(_event("playback_started")(i) for i in after)
            # the connection still feeds audio: a new utterance plays whole
            await bot.send_audio(tone[:8000])
            await bot.end_segment()
            done = (await _until(bot, _event("playback_finished")))[-1]
            assert done["interrupted"] is False and done["position"] == pytest.approx(0.52)
    finally:
        await srv.stop()


async def test_over_capacity_gets_a_busy_reply(server):
    bots = [BotClient(server.base_url) for _ in range(3)]
    for b in bots:
        await b.connect()
    try:
        await bots[0].start(frames="none")
        await bots[1].start(frames="none")
        status, body = await _get(server.base_url + "/api/capacity")
        assert status == 503 and body["error"] == "busy"
        with pytest.raises(BotError) as exc:
            await bots[2].start(frames="none")
        assert exc.value.code == "busy" and "try again" in str(exc.value)
        _, health = await _get(server.base_url + "/healthz")
        assert health["sessions"] == 2 and health["status"] == "ok" and health["backend"] == "preview"
        # a slot frees up: the same connection can start now
        await bots[0].close()
        for _ in range(50):
            if len(server.sessions) < 2:
                break
            await asyncio.sleep(0.05)
        info = await bots[2].start(frames="none")
        status, stats = await _get(f"{server.base_url}/api/sessions/{info['session']}")
        assert status == 200 and stats["session"] == info["session"]
    finally:
        for b in bots:
            await b.close()
    for _ in range(50):
        if len(server.sessions) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(server.sessions) == 0


async def test_a_broken_client_does_not_disturb_another_session(server, speech_16k):
    async with BotClient(server.base_url) as good, BotClient(server.base_url) as bad:
        await good.start(frames="jpeg")
        await bad.start(frames="jpeg")
        await good.send_audio(speech_16k)
        await bad.send_audio(speech_16k[:8000])
        await bad.ws.send("{{{")
        bad.ws.transport.abort()  # network drop, no close frame
        await good.end_segment()
        items = await _until(good, _event("playback_finished"))
        assert items[-1]["interrupted"] is False
        for _ in range(60):
            if len(server.sessions) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(server.sessions) == 1



async def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed(backend):
    """A hung bot (its TCP still up, nothing read): keepalive fails and the closing handshake cannot
    complete; the connection is cut and the session closed within a few seconds, not left holding a slot."""
    from websockets.asyncio.client import connect

    server = await _server(backend)
    server.config.keepalive.reader_timeout_s = 2.0  # the default (10 s) tolerates very slow readers
    ws = await connect(server.base_url.replace("http", "ws") + "/api/ws", max_queue=2, compression=None)
    try:
        await ws.send(json.dumps({"type": "start", "frames": "jpeg"}))
        for _ in range(100):
            if len(server.sessions) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(server.sessions) == 1
        for _ in range(80):  # 8 s at most: keepalive (2 s) + closing handshake (1 s)
            if len(server.sessions) == 0:
                break
            await asyncio.sleep(0.1)
        assert len(server.sessions) == 0 and server.health()["connections"] == 0
    finally:
        ws.transport.abort()
        await server.stop()


async def test_a_slow_reader_loses_its_oldest_frames_and_stays_connected(backend, speech_16k):
    """A bot reading ~10 of the 25 frames a second: its oldest frames are dropped (counted in stats), its
    late pongs do not get it disconnected, and another session keeps every frame."""
    import socket

    from websockets.asyncio.client import connect

    srv = await _server(backend)
    srv.config.limits.frames_send_buffer_bytes = 4096  # a short pipe: drops start within a second or two
    try:
        async with BotClient(srv.base_url, inbox=10_000) as good:  # read later, but never a slow reader
            await good.start(frames="jpeg")
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow = await connect(srv.base_url.replace("http", "ws") + "/api/ws", sock=sock, max_queue=2,
                                 compression=None, close_timeout=1)
            try:
                await slow.send(json.dumps({"type": "start", "frames": "jpeg"}))
                await good.send_audio(speech_16k)
                await good.end_segment()
                slow_frames, slow_events = [], []
                for _ in range(40):  # ~4 s at ~10 messages a second
                    message = await asyncio.wait_for(slow.recv(), 10)
                    if isinstance(message, bytes):
                        slow_frames.append(decode_frame(message)[0]["index"])
                    else:
                        slow_events.append(json.loads(message))
                    await asyncio.sleep(0.1)
                await slow.send(json.dumps({"type": "stats"}))
                for _ in range(200):  # everything still queued, then the stats reply: still connected
                    message = await asyncio.wait_for(slow.recv(), 10)
                    if isinstance(message, str) and json.loads(message)["type"] == "stats":
                        slow_stats = json.loads(message)
                        break
                good_items = await _until(good, _event("playback_finished"))
                good_stats = await good.stats()
            finally:
                await slow.close()
        assert "session_ended" not in [e["type"] for e in slow_events]
        assert slow_stats["frames_dropped"] > 0
        assert slow_frames == sorted(slow_frames) and slow_frames[-1] - slow_frames[0] > len(slow_frames)  # gaps
        assert slow_stats["playout"]["subscriber_drops"] >= slow_stats["frames_dropped"]
        # the other session lost nothing: every frame arrived, in order
        assert good_stats["frames_dropped"] == 0
        speech = [i.index for i in good_items if isinstance(i, ReceivedFrame) and i.speech]
        assert speech == list(range(speech[0], speech[0] + -(-len(speech_16k) // 640)))
    finally:
        await srv.stop()


async def test_a_talk_page_whose_peer_connection_closes_hears_session_ended(server):
    """The browser's WebRTC connection goes away: the session ends, and session_ended (with the
    reason) reaches the page before the server closes the WebSocket."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTrack(AudioStreamTrack())  # the "mic": silence
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with BotClient(server.base_url) as page:
            info = await page.request({"type": "start", "webrtc": {"type": "offer", "sdp": pc.localDescription.sdp}})
            await pc.setRemoteDescription(RTCSessionDescription(**info["answer"]))
            for _ in range(100):
                if pc.connectionState == "connected":
                    break
                await asyncio.sleep(0.1)
            assert pc.connectionState == "connected"
            await pc.close()
            ended = (await _until(page, _event("session_ended")))[-1]
            assert ended["session"] == info["session"] and ended["reason"] == "peer connection closed"
        for _ in range(50):
            if len(server.sessions) == 0:
                break
            await asyncio.sleep(0.05)
        assert len(server.sessions) == 0
    finally:
        await pc.close()

async def test_idle_sessions_time_out(backend):
    srv = await _server(backend)
    srv.config.sessions.idle_timeout_s = 0.4
    srv.sessions.config.sessions.idle_timeout_s = 0.4
    srv.sessions._reaper.cancel()
    srv.sessions.start()
    try:
        async with BotClient(srv.base_url) as bot:
            await bot.start(frames="none")
            items = await _until(bot, _event("session_ended"), timeout=5)
            assert items[-1]["reason"].startswith("idle")
        assert len(srv.sessions) == 0
    finally:
        await srv.stop()


async def test_token_auth_when_configured(backend):
    srv = await _server(backend, token="secret-token-0123456789abcdef")
    try:
        status, _ = await _get(srv.base_url + "/")
        assert status == 401
        status, page = await _get(srv.base_url + "/?token=secret-token-0123456789abcdef")
        assert status == 200 and 'id="start"' in page
        status, health = await _get(srv.base_url + "/healthz")
        assert status == 200 and health["status"] == "ok"
        with pytest.raises(BotError, match="401"):
            async with BotClient(srv.base_url):
                pass
        async with BotClient(srv.base_url, token="secret-token-0123456789abcdef") as bot:
            info = await bot.start(frames="none")
            # the OBS link carries the viewer token (viewing only), never the master token (issue 23)
            assert f"token={srv.routes.viewer_token}" in info["viewer_url"]
            assert "secret-token-0123456789abcdef" not in info["viewer_url"]
        # the talk page under /static/ is a page too; its scripts and styles stay public
        assert (await _get(srv.base_url + "/static/index.html"))[0] == 401
        assert (await _get(srv.base_url + "/static/INDEX.HTML"))[0] == 401
        assert (await _get(srv.base_url + "/static/index.html?token=secret-token-0123456789abcdef"))[0] == 200
        assert (await _get(srv.base_url + "/static/app.js"))[0] == 200
    finally:
        await srv.stop()


async def test_wrong_tokens_are_rate_limited(backend):
    """Past 10 wrong tokens an address's guesses are checked one per interval, at most 4 waiting (the
    rest 429); the right token still gets in, for pages and the WebSocket alike (issue 23: the limiter
    must not lock out the token's holder); health stays open."""
    from server.auth import WrongTokenLimiter

    srv = await _server(backend, token="secret-token-0123456789abcdef")
    srv.routes.limiter = WrongTokenLimiter(interval_s=0.2, max_waiting=4)
    try:
        assert [(await _get(srv.base_url + "/"))[0] for _ in range(12)] == [401] * 12  # no token: not guessing
        statuses = [(await _get(srv.base_url + f"/?token=guess-{i}"))[0] for i in range(10)]
        assert statuses == [401] * 10
        assert srv.routes.limiter.limited("127.0.0.1")
        burst = await asyncio.gather(*(_get(srv.base_url + f"/?token=burst-{i}") for i in range(5)))
        assert set(s for s, _ in burst) <= {401, 429}
        assert (await _get(srv.base_url + "/?token=secret-token-0123456789abcdef"))[0] == 200
        async with BotClient(srv.base_url, token="secret-token-0123456789abcdef") as bot:
            assert (await bot.request({"type": "ping"}))["type"] == "pong"
        assert (await _get(srv.base_url + "/healthz"))[0] == 200
    finally:
        await srv.stop()


def test_wrong_token_limiter_forgets_after_its_window():
    from server.auth import WrongTokenLimiter

    now = [0.0]
    limiter = WrongTokenLimiter(attempts=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert not limiter.limited("10.0.0.1")
        limiter.failed("10.0.0.1")
    assert limiter.limited("10.0.0.1") and not limiter.limited("10.0.0.2")
    now[0] = 61.0
    assert not limiter.limited("10.0.0.1")


async def test_bound_to_all_interfaces_the_urls_name_a_reachable_host(backend):
    from server.app import reachable_address

    srv = await _server(backend, host="0.0.0.0", token="secret-token-0123456789abcdef")
    try:
        assert "0.0.0.0" not in srv.base_url and f"//{reachable_address()}:" in srv.base_url
        # a client gets the viewer link at the host it reached the server by
        async with BotClient(f"http://localhost:{srv.port}", token="secret-token-0123456789abcdef") as bot:
            info = await bot.start(frames="none")
        assert info["viewer_url"].startswith(f"http://localhost:{srv.port}/viewer?session=")
    finally:
        await srv.stop()


async def test_bot_cli_records_an_mp4(server, speech_wav, tmp_path):
    from emo_stream.media import probe_durations
    from server.cli import main

    out = tmp_path / "reply.mp4"
    code = await asyncio.to_thread(main, ["bot", "--url", server.base_url, "--audio", str(speech_wav),
                                          "--out", str(out)])
    assert code == 0
    d = probe_durations(out)
    from emo_stream.media import load_audio

    seconds = len(load_audio(speech_wav)) / 16000
    assert abs(d["video_s"] - seconds) <= 0.04 + 1e-6
    assert abs(d["audio_s"] - d["video_s"]) < 0.05


async def test_a_fast_bot_meets_backpressure(backend):
    """Audio far ahead of playback is not read (TCP backpressure): what the server holds stays bounded,
    and a bot that vanishes meanwhile is still noticed and cleaned up quickly."""
    srv = StreamServer(load_config(None, port=0, size=SIZE, backend="preview"), backend=backend)
    srv.config.engine.vad = False
    srv.config.engine.input_seconds = 0.5
    srv.config.engine.output_frames = 10
    await srv.start()
    try:
        bot = BotClient(srv.base_url)
        await bot.connect()
        await bot.start(frames="none")
        pcm = (np.sin(np.arange(16000 * 20) / 10) * 8000).astype(np.int16)

        async def flood():
            for i in range(0, len(pcm), 3200):
                await bot.send_audio(pcm[i:i + 3200])

        sender = asyncio.create_task(flood())
        await asyncio.sleep(1.5)
        session = srv.sessions.all()[0]
        # read so far: engine input (0.5 s) and output (0.4 s) + the connection's 8 queued messages
        # (1.6 s) + what played (1.5 s); the bot has sent 20 s
        assert session.audio_seconds_in < 4.6
        assert session.input_backlog_s() <= 0.5 + 0.2
        sender.cancel()
        bot.ws.transport.abort()  # the bot's network goes away while the server is not reading
        for _ in range(60):
            if len(srv.sessions) == 0:
                break
            await asyncio.sleep(0.1)
        assert len(srv.sessions) == 0
        await asyncio.gather(sender, return_exceptions=True)
        await bot.close()
    finally:
        await srv.stop()


async def test_time_lost_in_an_engine_stall_is_won_back_on_idle_frames(server):
    """The engine held up for a second (e.g. a long avatar preparation holding the model): the playout
    re-anchors, then leaves out idle frames until the stream is back on time (not seconds behind for
    minutes), with only the one-frame cushion waiting in the engine."""
    import threading
    import time

    async with BotClient(server.base_url, inbox=10_000) as bot:
        await bot.start(frames="none")
        await asyncio.sleep(1.0)
        session = server.sessions.all()[0]
        before = session.stats()["playout"]

        def hold_the_model():
            with server.engine._model_lock:
                time.sleep(1.0)

        stall = threading.Thread(target=hold_the_model)
        stall.start()
        await asyncio.to_thread(stall.join)
        for _ in range(100):  # 10 s at most
            await asyncio.sleep(0.1)
            now = session.stats()
            won_back = now["playout"]["skipped_idle_frames"] - before["skipped_idle_frames"]
            if won_back >= 15 and now["output_queue_frames"] <= 3:
                break
        assert now["playout"]["reanchors"] > before["reanchors"]  # the stall did put the stream behind
        assert won_back >= 15, now["playout"]  # ~25 frames were lost; nearly all come back as left-out idle
        assert now["output_queue_frames"] <= 3, now
