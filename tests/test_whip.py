"""WHIP ingest and WHEP egress over plain HTTP, with aiortc as the client (simple-whip-client and Chromium
are in tests/test_whip_clients.py): a publisher's speech drives the avatar and comes back on the same
peer connection, players watch a session, and bad requests get the RFC 9725 status and touch nothing else."""

from __future__ import annotations

import asyncio
import fractions
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from server.app import StreamServer
from server.config import load_config

SIZE = 64
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def backend():
    from emo_stream.registry import create_backend

    return create_backend("preview", size=SIZE)


async def _server(backend, **over) -> StreamServer:
    cfg = load_config(None, port=0, size=SIZE, backend="preview", **over)
    cfg.engine.vad = False
    cfg.sessions.max_sessions = 2
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    return srv


@pytest.fixture
async def server(backend):
    srv = await _server(backend)
    yield srv
    await srv.stop()


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


async def http(method: str, url: str, body: bytes | str | None = None, headers: dict | None = None):
    if isinstance(body, str):
        body = body.encode()
    return await asyncio.to_thread(_http, method, url, body, headers)


def speech_track(pcm16k: np.ndarray | None = None):
    """An aiortc audio track sending 20 ms frames at 48 kHz in real time: the given 16 kHz speech, then silence."""
    import av
    from aiortc.mediastreams import MediaStreamTrack
    from scipy.signal import resample_poly

    audio = np.zeros(0, np.int16) if pcm16k is None else \
        (np.clip(resample_poly(pcm16k, 3, 1), -1, 1) * 32767).astype(np.int16)

    class Speech(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.n = 0
            self.t0: float | None = None

        async def recv(self):
            if self.t0 is None:
                self.t0 = time.monotonic()
            await asyncio.sleep(max(0.0, self.t0 + self.n * 0.02 - time.monotonic()))
            chunk = audio[self.n * 960:(self.n + 1) * 960]
            chunk = np.pad(chunk, (0, 960 - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, self.n * 960, fractions.Fraction(1, 48000)
            self.n += 1
            return frame

    return Speech()


class Client:
    """An aiortc peer that counts what it receives."""

    def __init__(self):
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.received = {"audio": 0, "video": 0}
        self.energy = 0.0
        self._readers: list[asyncio.Task] = []

        @self.pc.on("track")
        def _track(track):
            self._readers.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track):
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.received[track.kind] += 1
            if track.kind == "audio":
                self.energy += float(np.abs(frame.to_ndarray().astype(np.float32)).sum())

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def wait(self, kind: str, n: int, timeout: float = 20.0) -> None:
        t0 = time.monotonic()
        while self.received[kind] < n:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"received {self.received} within {timeout} s, wanted {n} {kind}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()
        for t in self._readers:
            t.cancel()


async def publish(base: str, pcm16k=None, *, receive: bool = True, headers: dict | None = None):
    """A WHIP publisher: speech out, and (receive=True) the avatar's video and audio back."""
    client = Client()
    client.pc.addTrack(speech_track(pcm16k))
    if receive:
        client.pc.addTransceiver("video", direction="recvonly")
    else:
        client.pc.getTransceivers()[0].direction = "sendonly"
    status, hdrs, body = await http("POST", base + "/whip", await client.offer(),
                                    {"Content-Type": "application/sdp", **(headers or {})})
    if status == 201:
        await client.answer(body.decode())
    return client, status, hdrs, body


async def play(base: str, session: str, headers: dict | None = None):
    """A WHEP player receiving video and audio."""
    client = Client()
    client.pc.addTransceiver("video", direction="recvonly")
    client.pc.addTransceiver("audio", direction="recvonly")
    status, hdrs, body = await http("POST", f"{base}/whep?session={session}", await client.offer(),
                                    {"Content-Type": "application/sdp", **(headers or {})})
    if status == 201:
        await client.answer(body.decode())
    return client, status, hdrs, body


async def test_whip_speech_drives_the_avatar_and_comes_back_on_the_same_connection(server, speech_16k):
    base = server.base_url
    client, status, headers, body = await publish(base, speech_16k)
    try:
        assert status == 201, body
        assert headers["Content-Type"] == "application/sdp" and body.startswith(b"v=0")
        location = headers["Location"]
        assert location.startswith(base + "/whip/")
        session = server.sessions.get(headers["Emo-Session"])
        assert session is not None and session.kind == "whip" and len(server.sessions) == 1
        await client.wait("video", 25)
        await client.wait("audio", 50)
        t0 = time.monotonic()
        while session.playout.speech_frames < 10 and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.1)
        assert session.audio_seconds_in > 0.5
        assert session.playout.speech_frames >= 10   # the publisher's speech made the avatar talk
        t0 = time.monotonic()
        while client.energy == 0 and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.1)
        assert client.energy > 0                      # ... and its voice came back with the picture

        status, _, _ = await http("DELETE", location)
        assert status == 200 and len(server.sessions) == 0 and session.closed
        status, _, body = await http("DELETE", location)
        assert status == 404 and b"no WHIP session" in body
    finally:
        await client.close()


async def test_a_send_only_publisher_is_watched_by_several_whep_players(server, speech_16k):
    base = server.base_url
    publisher, status, headers, _ = await publish(base, speech_16k, receive=False)
    players = []
    try:
        assert status == 201
        assert "m=video" not in _answer_media(publisher) or "a=inactive" in publisher.pc.remoteDescription.sdp
        session_id = headers["Emo-Session"]
        for which in (session_id, "latest"):
            player, status, hdrs, body = await play(base, which)
            players.append(player)
            assert status == 201, body
            assert hdrs["Location"].startswith(base + "/whep/") and hdrs["Emo-Session"] == session_id
        for player in players:
            await player.wait("video", 20)
            await player.wait("audio", 40)
        session = server.sessions.get(session_id)
        assert session.viewers == 2
        assert publisher.received == {"audio": 0, "video": 0}   # it asked for nothing back

        # one player leaves (DELETE): the other keeps playing, the session goes on
        status, _, _ = await http("DELETE", hdrs["Location"])
        assert status == 200 and session.viewers == 1 and not session.closed
        before = players[0].received["video"]
        await players[0].wait("video", before + 10)
        assert (await http("DELETE", hdrs["Location"]))[0] == 404

        # the publisher leaves: the session ends, so does its remaining player's resource
        await publisher.close()
        t0 = time.monotonic()
        while (len(server.sessions) or server.webrtc_http.resources) and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.1)
        assert len(server.sessions) == 0 and not server.webrtc_http.resources
    finally:
        await publisher.close()
        for p in players:
            await p.close()


def _answer_media(client) -> str:
    return client.pc.remoteDescription.sdp if client.pc.remoteDescription else ""


async def test_bad_requests_get_clear_statuses_and_leave_other_sessions_alone(backend):
    srv = await _server(backend, token=TOKEN)
    base = srv.base_url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sdp_type = {"Content-Type": "application/sdp"}
    live, status, headers, _ = await publish(base, None, headers=auth)
    try:
        assert status == 201
        session = srv.sessions.get(headers["Emo-Session"])
        await live.wait("video", 10)

        offer = await Client().offer()   # a valid-looking offer with no media
        watcher = Client()
        watcher.pc.addTransceiver("video", direction="recvonly")
        player_offer = await watcher.offer()
        await watcher.close()
        cases = [
            ("POST", "/whip", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n", {**auth, **sdp_type}, 400, b"not an SDP offer"),
            ("POST", "/whip", "m=audio\r\ngarbage", {**auth, **sdp_type}, 400, b"not an SDP offer"),
            ("POST", "/whip", "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF x\r\n", {**auth, **sdp_type}, 400, b""),
            ("POST", "/whip", offer, {**auth, **sdp_type}, 400, b""),
            ("POST", "/whip", "v=0\r\n", {**auth, "Content-Type": "application/json"}, 415, b"application/sdp"),
            ("POST", "/whip", "v=0\r\n", auth, 415, b"application/sdp"),
            ("POST", "/whip", "v=0\r\n", sdp_type, 401, b"token"),
            ("POST", "/whep?session=nope", player_offer, {**auth, **sdp_type}, 404, b"no session"),
            ("POST", "/whep", player_offer, {**auth, **sdp_type}, 400, b"session=ID"),
            ("POST", "/whip", player_offer, {**auth, **sdp_type}, 400, b"sends no audio"),
            ("DELETE", "/whip/unknown", None, auth, 404, b"no WHIP session"),
            ("DELETE", "/whep/unknown", None, auth, 404, b"no WHEP session"),
            ("DELETE", headers["Location"][len(base):], None, {}, 401, b"token"),
            ("PATCH", headers["Location"][len(base):], "a=ice-ufrag:x", {**auth, "Content-Type":
                                                                         "application/trickle-ice-sdpfrag"}, 405, b""),
            ("GET", "/whip?token=" + TOKEN, None, {}, 405, b"POST"),
            ("PUT", "/whip", "x", auth, 405, b""),
            ("POST", "/", "x", auth, 405, b"GET"),
        ]
        for method, path, body, hdrs, want, text in cases:
            status, reply_headers, reply = await http(method, base + path, body, hdrs)
            assert status == want, (method, path, status, reply)
            assert text in reply, (method, path, reply)
            if status == 401:
                assert reply_headers["WWW-Authenticate"].startswith("Bearer")
            if status == 405:
                assert reply_headers["Allow"]
        # a full server: 503 with Retry-After (two slots: the live one and this one)
        second, status, _, _ = await publish(base, None, headers=auth)
        assert status == 201
        third, status, full_headers, reply = await publish(base, None, headers=auth)
        assert status == 503 and full_headers["Retry-After"] and b"busy" in reply
        await third.close()
        await second.close()

        # none of it disturbed the live session
        assert not session.closed and srv.sessions.get(session.id) is session
        before = live.received["video"]
        await live.wait("video", before + 10)
    finally:
        await live.close()
        await srv.stop()


async def test_preflight_and_cors_follow_the_token_rule(backend):
    for token, cross_site_allowed in ((None, False), (TOKEN, True)):
        srv = await _server(backend, token=token)
        try:
            status, headers, _ = await http("OPTIONS", srv.base_url + "/whep", None, {
                "Origin": "https://player.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert status == 204 and "POST" in headers["Allow"]
            assert (headers.get("Access-Control-Allow-Origin") == "*") is cross_site_allowed
            if cross_site_allowed:
                assert "Authorization" in headers["Access-Control-Allow-Headers"]
                assert "Location" in headers["Access-Control-Expose-Headers"]
        finally:
            await srv.stop()


async def test_a_viewer_token_plays_but_does_not_publish(backend):
    srv = await _server(backend, token=TOKEN)
    srv.config.viewer_token = "viewer-token-123"   # the read-only token (see server.config)
    base = srv.base_url
    try:
        live, status, headers, _ = await publish(base, None, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 201
        viewer = {"Authorization": "Bearer viewer-token-123"}
        _, status, _, body = await publish(base, None, headers=viewer)
        assert status == 403 and b"not publish" in body
        player, status, hdrs, body = await play(base, "latest", headers=viewer)
        assert status == 201, body
        await player.wait("video", 10)
        status, _, _ = await http("DELETE", headers["Location"], None, viewer)
        assert status == 403   # a viewer cannot end the publisher's session
        assert (await http("DELETE", hdrs["Location"], None, viewer))[0] == 200
        await player.close()
        await live.close()
    finally:
        await srv.stop()


async def test_raw_http_edge_cases_are_refused_cleanly(server):
    """Bodies too large or chunked, garbage request lines, a request split into tiny pieces: each gets its one
    HTTP answer and the server goes on (a GET afterwards works)."""
    host, port = "127.0.0.1", server.port

    async def exchange(*pieces: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return reply

    head = f"POST /whip HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/sdp\r\n".encode()
    assert (await exchange(head + b"Content-Length: 999999999\r\n\r\n")).startswith(b"HTTP/1.1 413")
    assert (await exchange(head + b"Transfer-Encoding: chunked\r\n\r\n")).startswith(b"HTTP/1.1 411")
    assert (await exchange(head + b"Content-Length: nope\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert (await exchange(b"POST /whip HTTP/9\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 400")
    # the request line, headers and body in pieces of a few bytes: read whole, then answered (400: not SDP)
    request = head + b"Content-Length: 5\r\n\r\nhello"
    reply = await exchange(*(request[i:i + 3] for i in range(0, len(request), 3)))
    assert reply.startswith(b"HTTP/1.1 400") and b"not an SDP offer" in reply
    status, _, body = await http("GET", server.base_url + "/healthz")
    assert status == 200 and b"status" in body
