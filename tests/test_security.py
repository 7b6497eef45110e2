"""Issue 23 (security), the server's side: token guessing, the limiter behind proxies, DNS rebinding,
static names, secrets in logs and URLs, the viewer token and /healthz. Real servers on 127.0.0.1 (the
stand-in engine of test_server.py), raw sockets where a browser or attacker would send odd requests."""

from __future__ import annotations

import asyncio
import json
import math
import secrets

import pytest

from emo_stream.errors import ConfigError
from server.app import StreamServer
from server.config import load_config

from test_server import FakeEngine

pytestmark = pytest.mark.timeout(120)

TOKEN = "Zq3v_Lr8-Ke2PmX9tWb4NcY7hJ0aD5sF"   # 32 URL-safe characters: ~190 bits


async def _server(**over) -> StreamServer:
    srv = StreamServer(load_config(None, port=0, size=64, **over), engine=FakeEngine())
    await srv.start()
    return srv


@pytest.fixture
async def server():
    srv = await _server(token=TOKEN)
    yield srv
    await srv.stop()


async def _raw(port: int, path: str, headers: dict | None = None, host: str | None = None,
               upgrade: bool = False, method: str = "GET") -> tuple[int, str]:
    """One request on its own connection, as an attacker or a browser would send it: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                  "Sec-WebSocket-Version: 13"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        if upgrade:
            status_line = await asyncio.wait_for(reader.readline(), 15)
            return int(status_line.split()[1]), ""
        data = await asyncio.wait_for(reader.read(), 15)   # the server closes after each HTTP reply
    finally:
        writer.close()
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


async def _statuses(port: int, paths: list[str], headers: dict | None = None) -> list[int]:
    """All at once (the race a guesser runs)."""
    return [s for s, _ in await asyncio.gather(*(_raw(port, p, headers) for p in paths))]


# -- item 3: guesses are counted however the token is spelled; tokens of at least 128 bits ------------

@pytest.mark.parametrize("name", ["token", "tok%65n", "%74%6F%6B%65%6E"])
async def test_guesses_count_however_the_token_parameter_is_spelled(server, name):
    port = server.port
    assert (await _raw(port, f"/?{name}={TOKEN}"))[0] == 200   # the name is decoded: it is the token
    for i in range(10):
        assert (await _raw(port, f"/?{name}=guess-{i}"))[0] == 401
    burst = await _statuses(port, [f"/?{name}=burst-{i}" for i in range(10)])
    assert set(burst) <= {401, 429} and burst.count(429) >= 5, burst   # at most 4 wait their turn


def test_user_chosen_tokens_need_128_bits():
    for weak in ("secret-token-123", "correcthorse", "a" * 40, "0123456789" * 3, "AbCdEfGhIjKlMnOpQrStUv"):
        with pytest.raises(ConfigError, match="too weak.*128") as exc:
            load_config(None, token=weak)
        assert "\n" not in str(exc.value)
    for strong in (secrets.token_urlsafe(16), secrets.token_urlsafe(24), secrets.token_hex(16), TOKEN):
        assert load_config(None, token=strong).token == strong
    with pytest.raises(ConfigError, match="viewer_token is too weak"):
        load_config(None, token=TOKEN, viewer_token="viewer-123")
    generated = load_config(None, host="0.0.0.0")
    generated.ensure_token()
    from server.auth import token_bits

    assert token_bits(generated.token) >= 128


def test_every_token_urlsafe_16_counts_128_bits(monkeypatch):
    """docs/security.md: 22 random URL-safe characters suffice. 2000 draws of secrets.token_urlsafe(16), its bytes
    from a seeded generator (the same encoding, no flake), all pass, those missing a class included (about 1 in
    100 has neither digits nor - _: 52 letters alone would count 125 bits); the weak ones above still fail."""
    import random

    from server.auth import token_bits

    monkeypatch.setattr(secrets, "token_bytes", random.Random(20).randbytes)
    tokens = [secrets.token_urlsafe(16) for _ in range(2000)]
    assert {len(t) for t in tokens} == {22}
    letters_only = [t for t in tokens if t.isalpha()]
    assert len(letters_only) >= 5 and 22 * math.log2(52) < 128   # the case that was refused
    assert min(token_bits(t) for t in tokens) >= 128
    for t in tokens[:50] + letters_only[:5]:
        assert load_config(None, token=t).token == t


# -- item 4: the limiter slows guessing without locking out the token's holder ------------------------

async def test_the_right_token_gets_in_from_an_address_that_is_being_slowed(server):
    from server.bot_client import BotClient

    port = server.port
    for i in range(12):
        assert (await _raw(port, f"/?token=guess-{i}"))[0] == 401
    burst = await _statuses(port, [f"/api/sessions?token=burst-{i}" for i in range(10)])
    assert burst.count(429) >= 5, burst           # guessing from this address is slowed ...
    assert (await _raw(port, f"/?token={TOKEN}"))[0] == 200   # ... and the holder still gets in
    for i in range(3):
        assert (await _raw(port, f"/?token=again-{i}"))[0] == 401
    assert (await _raw(port, "/api/ws", {"Authorization": f"Bearer {TOKEN}"}, upgrade=True))[0] == 101
    async with BotClient(server.base_url, token=TOKEN) as bot:
        assert (await bot.request({"type": "ping"}))["type"] == "pong"
    assert (await _raw(port, "/healthz"))[0] == 200


async def test_behind_a_trusted_proxy_each_client_is_counted_apart():
    from server.auth import WrongTokenLimiter

    srv = await _server(token=TOKEN, trusted_proxies=["127.0.0.1"])
    srv.routes.limiter = WrongTokenLimiter(interval_s=0.2)   # the default 1 s, faster
    port = srv.port
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    try:
        for i in range(10):
            assert (await _raw(port, f"/?token=guess-{i}", attacker))[0] == 401
        assert (await _statuses(port, [f"/?token=b{i}" for i in range(10)], attacker)).count(429) >= 5
        # a hop the attacker writes itself (left of the proxy's) does not make a new client
        spoofed = {"X-Forwarded-For": "198.51.100.99, 203.0.113.7"}
        assert (await _statuses(port, [f"/?token=c{i}" for i in range(10)], spoofed)).count(429) >= 5
        # another client behind the same proxy: its typo is a plain 401, its token gets in at once
        user = {"X-Forwarded-For": "198.51.100.20"}
        assert (await _raw(port, "/?token=typo", user))[0] == 401
        assert (await _raw(port, f"/?token={TOKEN}", user))[0] == 200
        assert (await _raw(port, "/api/ws", {**user, "Authorization": f"Bearer {TOKEN}"}, upgrade=True))[0] == 101
    finally:
        await srv.stop()
    # without the setting X-Forwarded-For is the client's own text: rotating it changes nothing
    srv = await _server(token=TOKEN)
    srv.routes.limiter = WrongTokenLimiter(interval_s=0.2)
    try:
        for i in range(10):
            assert (await _raw(srv.port, f"/?token=g{i}", {"X-Forwarded-For": f"198.51.100.{i}"}))[0] == 401
        burst = await asyncio.gather(*(_raw(srv.port, f"/?token=r{i}", {"X-Forwarded-For": f"192.0.2.{i}"})
                                       for i in range(10)))
        assert [s for s, _ in burst].count(429) >= 5
    finally:
        await srv.stop()


async def test_limiter_windows_and_ipv6_prefixes():
    from server.auth import WrongTokenLimiter

    now = [0.0]
    limiter = WrongTokenLimiter(attempts=3, window_s=60, interval_s=0.01, max_waiting=1, clock=lambda: now[0])
    for _ in range(3):
        assert not limiter.limited("10.0.0.1") and await limiter.admit("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.limited("10.0.0.1") and not limiter.limited("10.0.0.2")
    for _ in range(3):
        limiter.failed("2001:db8:1:2::10")
    assert limiter.limited("2001:db8:1:2::ffff") and not limiter.limited("2001:db8:1:3::10")   # by /64
    now[0] = 61.0
    assert not limiter.limited("10.0.0.1")
    for _ in range(3):
        limiter.failed("10.0.0.3")
    limiter.succeeded("10.0.0.3")
    assert not limiter.limited("10.0.0.3")


# -- item 5: DNS rebinding - loopback mode answers its own names only --------------------------------

async def test_loopback_mode_answers_only_loopback_and_configured_host_names():
    srv = await _server(allowed_hosts=["avatar.lan"])   # loopback, no token
    port = srv.port
    try:
        evil = f"evil.example:{port}"
        origin = {"Origin": f"http://{evil}"}
        assert (await _raw(port, "/api/sessions", origin, host=evil))[0] == 421
        assert (await _raw(port, "/api/ws", origin, host=evil, upgrade=True))[0] == 421
        assert (await _raw(port, "/", host=evil))[0] == 421
        sdp = {"Content-Type": "application/sdp", "Content-Length": "0"}
        assert (await _raw(port, "/whip", {**origin, **sdp}, host=evil, method="POST"))[0] == 421   # WHIP too
        assert (await _raw(port, "/whip", {**origin, **sdp}, host=evil, method="OPTIONS"))[0] == 421
        for bad in (f"localhost:{port + 1}", "127.0.0.1", f"127.0.0.1.nip.io:{port}", f"[::2]:{port}"):
            assert (await _raw(port, "/api/sessions", host=bad))[0] == 421, bad
        for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}",
                     "avatar.lan", f"avatar.lan:{port}"):
            status, body = await _raw(port, "/api/sessions", host=good)
            assert status == 200 and json.loads(body) == {"sessions": []}, good
        good = f"127.0.0.1:{port}"
        assert (await _raw(port, "/api/ws", {"Origin": f"http://{good}"}, host=good, upgrade=True))[0] == 101
    finally:
        await srv.stop()


# -- item 10: static names that Windows reads differently ---------------------------------------------

async def test_static_names_with_colons_trailing_dots_or_device_names_are_refused(tmp_path, monkeypatch):
    import server.http

    for name in ("ok.js", "page.html.", "a:b.js", "con.js", "index.html"):
        (tmp_path / name).write_text("x")
    monkeypatch.setattr(server.http, "CLIENT_DIR", tmp_path)
    srv = await _server(token=TOKEN)
    try:
        assert (await _raw(srv.port, "/static/ok.js"))[0] == 200
        # on Windows "page.html." opens page.html, without the token the .html check asks for
        for path in ("/static/page.html.", "/static/a:b.js", "/static/con.js", "/static/ok.js::$DATA"):
            assert (await _raw(srv.port, path))[0] == 404, path
        assert (await _raw(srv.port, f"/static/page.html.?token={TOKEN}"))[0] == 404
        for name in ("ok.js ", "ok.js.", "c:ok.js", "NUL", "lpt1.js"):
            assert srv.routes.static(name).status_code == 404, name
    finally:
        await srv.stop()


# -- item 11: secrets out of logs, URLs, reprs and the process list -----------------------------------

async def test_tokens_stay_out_of_access_and_exception_logs(server, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="websockets")
    caplog.set_level(logging.DEBUG, logger="server")
    port = server.port
    assert (await _raw(port, f"/api/sessions?token={TOKEN}"))[0] == 200
    assert (await _raw(port, "/api/sessions", {"Authorization": f"Bearer {TOKEN}"}))[0] == 200
    assert (await _raw(port, f"/api/ws?tok%65n={TOKEN}", upgrade=True))[0] == 101
    server.sessions.all = lambda: 1 / 0     # a bug while answering a request that carries the token
    try:
        assert (await _raw(port, f"/api/sessions?token={TOKEN}"))[0] == 500
    finally:
        del server.sessions.all
    assert "HTTP /api/sessions?token=[redacted] failed" in caplog.text
    assert "GET /api/sessions?token=[redacted]" in caplog.text   # the access log still shows the request
    assert TOKEN not in caplog.text and TOKEN[:12] not in caplog.text


async def test_viewer_token_opens_the_viewer_and_nothing_else(server):
    from aiortc import RTCConfiguration, RTCPeerConnection

    from server.bot_client import BotClient, BotError

    async with BotClient(server.base_url, token=TOKEN) as owner:
        info = await owner.start(frames="none")
        url = info["viewer_url"]
        assert TOKEN not in url and TOKEN not in server.viewer_url("latest")
        viewer_token = url.split("token=")[1]
        assert viewer_token == server.routes.viewer_token and len(viewer_token) >= 22
        port = server.port
        assert (await _raw(port, f"/viewer?session=latest&token={viewer_token}"))[0] == 200
        for path in ("/", "/api/sessions", f"/api/sessions/{info['session']}", "/static/index.html",
                     "/api/avatar.jpg", "/api/capacity"):
            assert (await _raw(port, f"{path}?token={viewer_token}"))[0] in (401, 403), path
        status, body = await _raw(port, f"/healthz?token={viewer_token}")
        assert set(json.loads(body)) == {"status", "backend"}
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            async with BotClient(server.base_url, token=viewer_token) as viewer:
                for request in ({"type": "start"}, {"type": "stats"},
                                {"type": "avatar", "content_type": "image/png", "size": 10}):
                    with pytest.raises(BotError, match="viewer token allows only view"):
                        await viewer.request(request)
                pc.addTransceiver("video", direction="recvonly")
                pc.addTransceiver("audio", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                reply = await viewer.request({"type": "view", "session": info["session"],
                                              "webrtc": {"type": "offer", "sdp": pc.localDescription.sdp}})
                assert reply["type"] == "view_started"
                assert len(server.sessions) == 1
        finally:
            await pc.close()


def test_secrets_on_the_command_line_are_warned_about(tmp_path, capsys, monkeypatch):
    from server.auth import read_secret
    from server.cli import main

    assert main(["serve", "--token", TOKEN, "--port", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--token puts the token in the process list" in err and "--token-file" in err and TOKEN not in err
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert main(["serve", "--token-file", str(path), "--port", "-1"]) == 2
    assert "process list" not in capsys.readouterr().err
    monkeypatch.setenv("EMO_STREAM_TOKEN", "from-the-environment-0123456789")
    read = dict(flag_name="--token", file_flag="--token-file", env="EMO_STREAM_TOKEN", what="token")
    assert read_secret(flag=None, file=str(path), **read) == TOKEN
    assert read_secret(flag=None, file=None, **read) == "from-the-environment-0123456789"
    with pytest.raises(ConfigError, match="--token-file .*nope"):
        read_secret(flag=None, file=str(tmp_path / "nope"), **read)
    assert main(["bot", "--url", "http://127.0.0.1:9", "--token", TOKEN, "--audio", str(tmp_path / "none.wav"),
                 "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert "--token puts the token in the process list" in err and TOKEN not in err
    assert main(["worker", "--api-secret", TOKEN, "--drain-timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--api-secret puts the API secret in the process list" in err and TOKEN not in err


def test_config_reprs_leave_the_secrets_out():
    cfg = load_config(None, token=TOKEN, viewer_token=TOKEN[::-1])
    assert TOKEN not in repr(cfg) and TOKEN[::-1] not in repr(cfg)


def test_worker_config_repr_leaves_the_api_secret_out():
    pytest.importorskip("livekit.agents", reason="needs the livekit extra")
    from emo_stream.livekit.worker import WorkerConfig

    cfg = WorkerConfig(url="wss://lk.example", api_key="devkey", api_secret=TOKEN)
    assert TOKEN not in repr(cfg) and "devkey" in repr(cfg)


# -- item 12: health details behind the token; the worker's health server on loopback ----------------

async def test_health_details_need_the_master_token(server):
    status, body = await _raw(server.port, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "backend": "fake"}
    status, body = await _raw(server.port, f"/healthz?token={TOKEN}")
    health = json.loads(body)
    assert {"sessions", "viewers", "uptime_s", "connections"} <= set(health) and health["status"] == "ok"
    # loopback without a token: no token to ask for, the Host check keeps other sites' pages out
    srv = await _server()
    try:
        assert "sessions" in json.loads((await _raw(srv.port, "/healthz"))[1])
    finally:
        await srv.stop()


async def test_worker_health_server_listens_on_loopback_unless_configured():
    """livekit-agents' health server (load, job count) listened on every interface: the real AgentServer,
    its LiveKit URL a closed loopback port (it keeps retrying), its health socket looked at."""
    pytest.importorskip("livekit.agents", reason="needs the livekit extra")
    from emo_stream.livekit.worker import AvatarWorker, WorkerConfig

    class Host:
        capacity, load, free_slots, size = 1, 0.0, 1, 64

    configured = WorkerConfig(url="ws://127.0.0.1:9", api_key="k", api_secret=TOKEN, http_host="0.0.0.0")
    assert AvatarWorker(Host(), configured).build_server()._host == "0.0.0.0"   # when the operator asks
    for expected in ("127.0.0.1",):
        config = WorkerConfig(url="ws://127.0.0.1:9", api_key="k", api_secret=TOKEN, http_port=0, idle_threads=0)
        server = AvatarWorker(Host(), config).build_server()
        run = asyncio.create_task(server.run())
        try:
            for _ in range(200):
                http = getattr(server, "_http_server", None)
                if http is not None and http._runner is not None and http.port:
                    break
                await asyncio.sleep(0.05)
            addresses = {address[0] for address in http._runner.addresses}
            assert addresses == {expected}, addresses
            reader, writer = await asyncio.open_connection(expected, http.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 ")
            writer.close()
        finally:
            await server.aclose()
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


# -- item 7: ICE candidates in offers limited and policed; answers show only what the client needs -----

def _offer_with(sdp: str, candidates: list[str]) -> str:
    """The offer with extra candidate lines in its first media section."""
    lines = sdp.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("m="))
    lines[first + 1:first + 1] = candidates
    return "\r\n".join(lines) + "\r\n"


def _udp_targets(n: int) -> list:
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    return socks


def _probed(socks) -> int:
    """How many of the sockets received anything (STUN checks)."""
    hit = 0
    for s in socks:
        try:
            s.recv(2048)
            hit += 1
        except BlockingIOError:
            pass
    return hit


async def _view(server, sdp: str, headers: dict | None = None) -> str:
    """A `view` of the server's only session with this offer; the answer's SDP."""
    from websockets.asyncio.client import connect

    url = server.base_url.replace("http", "ws") + "/api/ws"
    async with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})}) as ws:
        await ws.send(json.dumps({"type": "view", "session": "latest", "webrtc": {"type": "offer", "sdp": sdp}}))
        while True:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if reply["type"] in ("view_started", "error"):
                assert reply["type"] == "view_started", reply
                await asyncio.sleep(2.5)   # the server's ICE agent checks its candidate pairs meanwhile
                return reply["answer"]["sdp"] if "answer" in reply else reply["sdp"]


async def _recvonly_offer():
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def _view_naming_loopback_candidates(server, n: int, headers: dict | None = None) -> tuple[str, int]:
    """A viewer's offer that names `n` extra loopback candidates, each a UDP socket of ours that notes what reaches
    it (a session of the owner's is up meanwhile): the server's answer SDP and how many sockets it probed."""
    from server.bot_client import BotClient

    socks = _udp_targets(n)
    pc = await _recvonly_offer()
    try:
        async with BotClient(server.base_url, token=TOKEN) as owner:
            await owner.start(frames="none")
            extra = [f"a=candidate:x{i} 1 udp 2130706431 127.0.0.1 {s.getsockname()[1]} typ host"
                     for i, s in enumerate(socks)]
            answer = await _view(server, _offer_with(pc.localDescription.sdp, extra), headers)
        return answer, _probed(socks)
    finally:
        await pc.close()
        for s in socks:
            s.close()


async def test_an_offer_with_many_candidates_makes_the_server_probe_a_few(server):
    from server.ice_policy import MAX_PER_SECTION

    answer, probed = await _view_naming_loopback_candidates(server, 40)
    # a client on this machine may name loopback candidates: some are checked, never all 40
    assert 0 < probed <= MAX_PER_SECTION, probed
    assert "a=candidate:" in answer   # and it is shown the server's candidates (loopback: all)


async def test_a_remote_client_cannot_point_the_server_at_loopback_or_learn_private_addresses():
    from server.ice_policy import PRIVATE, scope

    srv = await _server(token=TOKEN, trusted_proxies=["127.0.0.1"])   # a client on the internet, via a proxy
    try:
        answer, probed = await _view_naming_loopback_candidates(srv, 6, {"X-Forwarded-For": "9.9.9.9"})
        assert probed == 0
        shown = [line.split()[4] for line in answer.splitlines() if line.startswith("a=candidate:")]
        assert all(scope(address) > PRIVATE for address in shown), shown   # no LAN or loopback address of ours
    finally:
        await srv.stop()


# addresses below are only text in SDP and headers: no packet is sent to them
@pytest.mark.parametrize("candidate, peer, allowed", [
    ("1 1 udp 1 1.1.1.1 5000 typ host", "8.8.8.8", True),
    ("1 1 udp 1 192.168.1.20 5000 typ host", "8.8.8.8", False),     # LAN address from the internet
    ("1 1 udp 1 192.168.1.20 5000 typ host", "192.168.1.30", True),
    ("1 1 udp 1 127.0.0.1 5000 typ host", "192.168.1.30", False),        # our own loopback from the LAN
    ("1 1 udp 1 127.0.0.1 5000 typ host", "127.0.0.1", True),
    ("1 1 udp 1 abcd-1234.local 5000 typ host", "127.0.0.1", True),      # Chrome's mDNS names
    ("1 1 udp 1 abcd-1234.local 5000 typ host", "8.8.8.8", False),
    ("1 1 udp 1 internal.example 5000 typ host", "127.0.0.1", False),
    ("1 1 udp 1 169.254.169.254 80 typ host", "127.0.0.1", False),       # cloud metadata
    ("1 1 udp 1 fe80::1 5000 typ host", "127.0.0.1", False),
    ("1 1 udp 1 224.0.0.251 5353 typ host", "127.0.0.1", False),
    ("1 1 udp 1 255.255.255.255 5000 typ host", "127.0.0.1", False),
    ("1 1 udp 1 0.0.0.0 5000 typ host", "127.0.0.1", False),
    ("1 1 udp 1 1.1.1.1 0 typ host", "127.0.0.1", False),
    ("1 1 tcp 1 1.1.1.1 9 typ host tcptype active", "127.0.0.1", False),
    ("1 1 udp 1 ::ffff:10.0.0.1 5000 typ host", "8.8.8.8", False),
    ("1 1 udp 1 1.1.1.1 5000 typ srflx raddr 10.0.0.1 rport 5000", "8.8.8.8", True),
])
def test_offer_candidate_policy(candidate, peer, allowed):
    from server.ice_policy import remote_candidate_allowed

    assert remote_candidate_allowed("a=candidate:" + candidate, peer) is allowed


def test_answers_show_the_address_the_client_reached():
    from server.ice_policy import filter_answer

    sdp = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
           "m=audio 4000 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 172.17.0.1\r\n"
           "a=candidate:1 1 udp 1 172.17.0.1 4000 typ host\r\na=candidate:2 1 udp 1 192.168.1.5 4001 typ host\r\n"
           "a=candidate:3 1 udp 1 fd00::5 4002 typ host\r\na=candidate:4 1 udp 1 1.0.0.50 4003 typ host\r\n"
           "a=end-of-candidates\r\n")
    lan = filter_answer(sdp, "192.168.1.30", "192.168.1.5")
    assert "192.168.1.5 4001" in lan and "172.17.0.1" not in lan and "fd00::5" not in lan and "1.0.0.50" not in lan
    assert "m=audio 4001 " in lan and "c=IN IP4 192.168.1.5" in lan
    internet = filter_answer(sdp, "8.8.8.8", "127.0.0.1")   # behind a reverse proxy on this machine
    assert "1.0.0.50" in internet and "192.168.1.5" not in internet and "172.17.0.1" not in internet
    assert filter_answer(sdp, "127.0.0.1", "127.0.0.1") == sdp   # a local client: all (it can list them itself)
