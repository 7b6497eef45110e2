"""Portrait URLs from LiveKit dispatch metadata (issue 23 item 1, SSRF): real HTTP servers on 127.0.0.1 and
[::1]; a public-looking name is made to resolve to them by replacing the resolver the policy calls."""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from emo_stream.errors import ImageInputError
from emo_stream.livekit import url_fetch
from emo_stream.livekit.metadata import fetch_image
from emo_stream.livekit.url_fetch import UrlPolicy, fetch

pytestmark = pytest.mark.timeout(60)

LOCAL = UrlPolicy(networks=("127.0.0.1/32",))   # the test server's address, allowed as an operator would


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


class Site:
    """A tiny HTTP server: `routes` maps a path to (status, headers, body); every request is recorded."""

    def __init__(self, host: str = "127.0.0.1", routes: dict | None = None, port: int = 0):
        self.routes = routes or {}
        self.requests: list[tuple[str, dict]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                site.requests.append((self.path, dict(self.headers)))
                status, headers, body = site.routes.get(self.path.split("?")[0], (404, {}, b"no"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        kind = type("Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6 if ":" in host
                                                        else socket.AF_INET, "daemon_threads": True})
        self.httpd = kind((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.host = host
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Listener:
    """A bare TCP listener that counts connections (an ftp:// target, a port that is never meant to be hit)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def site():
    s = Site(routes={"/p.png": (200, {"Content-Type": "image/png"}, _png())})
    yield s
    s.close()


@pytest.fixture
def names(monkeypatch):
    """Public-looking names resolve to whatever the test says (the resolver the policy calls)."""
    table: dict[str, list[str]] = {}
    calls: list[str] = []

    def fake(host, port):
        calls.append(host)
        answer = table[host]
        return answer.pop(0) if answer and isinstance(answer[0], list) else answer

    monkeypatch.setattr(url_fetch, "resolve", fake)
    return table, calls


def test_loopback_urls_are_refused_without_a_request(site):
    with pytest.raises(ImageInputError, match="could not download"):
        fetch_image(site.url("/p.png"))
    with pytest.raises(ImageInputError):
        fetch_image(f"http://localhost:{site.port}/p.png")
    assert site.requests == []
    assert fetch_image(site.url("/p.png"), LOCAL).shape == (24, 32, 3)   # allowed by the operator: downloads


def test_every_redirect_is_checked_before_connecting(site, names):
    table, _ = names
    table["portraits.example"] = ["127.0.0.1"]
    v6 = Site("::1", routes={"/p.png": (200, {}, _png())})
    other_loopback = Site("127.0.0.2", routes={"/p.png": (200, {}, _png())})
    ftp = Listener()
    table["rebound.example"] = ["127.0.0.2"]
    site.routes.update({
        "/to-v4": (302, {"Location": f"http://127.0.0.2:{other_loopback.port}/p.png"}, b""),
        "/to-v6": (301, {"Location": v6.url("/p.png")}, b""),
        "/to-ftp": (307, {"Location": f"ftp://127.0.0.1:{ftp.port}/p.png"}, b""),
        "/to-name": (308, {"Location": f"http://rebound.example:{other_loopback.port}/p.png"}, b""),
        "/to-mapped": (302, {"Location": f"http://[::ffff:127.0.0.2]:{other_loopback.port}/p.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/ok": (302, {"Location": "/p.png"}, b""),
    })
    try:
        for path in ("/to-v4", "/to-v6", "/to-ftp", "/to-name", "/to-mapped", "/loop"):
            with pytest.raises(ImageInputError, match="could not download"):
                fetch(f"http://portraits.example:{site.port}{path}", LOCAL)
        assert v6.requests == [] and other_loopback.requests == [] and ftp.accepted == 0
        assert fetch(f"http://portraits.example:{site.port}/ok", LOCAL) == _png()   # a redirect in policy
        assert site.requests[-1][1]["Host"] == f"portraits.example:{site.port}"
    finally:
        v6.close()
        other_loopback.close()
        ftp.close()


def test_the_connection_goes_to_the_address_that_was_checked(names):
    """DNS rebinding: a second answer (after the check) must not be where the bytes come from."""
    table, calls = names
    good = Site("127.0.0.1", routes={"/p.png": (200, {}, b"checked")})
    # the same port on 127.0.0.2 serves a secret: a fetcher that resolved again to connect would get it
    evil = Site("127.0.0.2", routes={"/p.png": (200, {}, b"internal secret")}, port=good.port)
    table["flip.example"] = [["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]]
    try:
        assert fetch(f"http://flip.example:{good.port}/p.png", LOCAL) == b"checked"
        assert calls == ["flip.example"] and evil.requests == []   # resolved once, connected to that answer
    finally:
        good.close()
        evil.close()


def test_a_name_with_any_private_answer_is_refused(names, site):
    table, _ = names
    table["mixed.example"] = ["93.184.215.14", "127.0.0.1"]
    with pytest.raises(ImageInputError):
        fetch(f"http://mixed.example:{site.port}/p.png")
    assert site.requests == []


def test_host_allow_list(names, site):
    table, calls = names
    table["images.example"] = table["cdn.images.example"] = table["evil.example"] = ["127.0.0.1"]
    policy = UrlPolicy(hosts=("images.example", ".images.example"), networks=("127.0.0.1/32",))
    assert fetch(f"http://images.example:{site.port}/p.png", policy) == _png()
    assert fetch(f"http://cdn.images.example:{site.port}/p.png", policy) == _png()
    with pytest.raises(ImageInputError):
        fetch(f"http://evil.example:{site.port}/p.png", policy)
    assert "evil.example" not in calls   # refused before any DNS query


class Drip:
    """Answers every connection with headers, then one byte per `interval` for at most `limit` bytes."""

    def __init__(self, interval: float = 0.1, limit: int = 80, headers_slowly: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.interval, self.limit, self.headers_slowly = interval, limit, headers_slowly
        self.finished = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n"
        try:
            conn.recv(4096)
            if not self.headers_slowly:
                conn.sendall(head + b"\r\n")
            for i in range(self.limit):
                conn.sendall(b"X-A: b\r\n"[i % 8:i % 8 + 1] if self.headers_slowly else b"x")
                time.sleep(self.interval)
        except OSError:
            pass
        finally:
            self.finished.set()
            conn.close()
            self.sock.close()


@pytest.mark.parametrize("headers_slowly", [False, True])
def test_one_byte_at_a_time_cannot_outlast_the_total_budget(headers_slowly):
    drip = Drip(interval=0.1, limit=80, headers_slowly=headers_slowly)   # 8 s of dripping at most
    policy = UrlPolicy(networks=("127.0.0.1/32",), timeout_s=1.0)
    with pytest.raises(ImageInputError, match="slower than 1 s"):
        fetch(f"http://127.0.0.1:{drip.port}/p.png", policy)
    # a per-read timeout would have waited for the whole drip: the budget ended it first
    assert not drip.finished.is_set()


def test_size_budget_with_and_without_a_content_length(site):
    site.routes["/big"] = (200, {}, b"x" * 300_000)
    policy = UrlPolicy(networks=("127.0.0.1/32",), max_bytes=100_000)
    with pytest.raises(ImageInputError, match="larger than"):
        fetch(site.url("/big"), policy)
    # no Content-Length (the body ends at close): counted while reading
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        conn.recv(4096)
        try:
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 300_000)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(ImageInputError):
        fetch(f"http://127.0.0.1:{server.getsockname()[1]}/", policy)
    server.close()


def test_errors_are_generic_and_carry_no_credentials(caplog):
    """A closed port, a server that never answers and a refused address read the same to the dispatcher;
    the URL's user:password and query (signatures) appear neither in the error nor in the log."""
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    silent = socket.create_server(("127.0.0.1", 0))   # accepts (backlog) and never answers
    policy = UrlPolicy(networks=("127.0.0.1/32",), timeout_s=0.5)
    texts = []
    for port, pol in ((closed_port, policy), (silent.getsockname()[1], policy), (closed_port, UrlPolicy())):
        with pytest.raises(ImageInputError) as exc:
            fetch(f"http://user:hunter2@127.0.0.1:{port}/a.png?sig=SIGNATURE", pol)
        texts.append(str(exc.value).replace(str(port), "PORT").replace("20 s", "0.5 s").replace("20 MiB", "X"))
    silent.close()
    assert texts[0] == texts[1]
    assert texts[0].split(":")[0] == texts[2].split(":")[0]
    for text in texts + [caplog.text]:
        assert "hunter2" not in text and "SIGNATURE" not in text and "user" not in text


@pytest.mark.parametrize("ip, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("239.255.255.250", False), ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False),
    ("fd00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("2002:7f00:1::", False), ("2002:a00:1::", False),
])
def test_address_classes(ip, public):
    assert url_fetch.is_public(ipaddress.ip_address(ip)) is public


def test_https_to_the_checked_address_still_verifies_the_certificate_for_the_name(tmp_path, names, monkeypatch):
    """The connection is pinned to the checked address, and TLS is still verified for the URL's name (SNI)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def cert_for(name: str):
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                        "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        return cert, key

    table, _ = names
    table["portraits.example"] = ["127.0.0.1"]
    good_cert, good_key = cert_for("portraits.example")
    other_cert, other_key = cert_for("other.example")
    trust = ssl.create_default_context(cafile=str(good_cert))
    trust.load_verify_locations(cafile=str(other_cert))
    monkeypatch.setattr(url_fetch.ssl, "create_default_context", lambda: trust)
    for cert, key, ok in ((good_cert, good_key, True), (other_cert, other_key, False)):
        site = Site(routes={"/p.png": (200, {}, b"over tls")})
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(cert), str(key))
        site.httpd.socket = server_ctx.wrap_socket(site.httpd.socket, server_side=True)
        try:
            if ok:
                assert fetch(f"https://portraits.example:{site.port}/p.png", LOCAL) == b"over tls"
            else:   # a certificate for another name, trusted or not, is refused
                with pytest.raises(ImageInputError):
                    fetch(f"https://portraits.example:{site.port}/p.png", LOCAL)
        finally:
            site.close()
    monkeypatch.undo()
    site = Site(routes={"/p.png": (200, {}, b"x")})
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(good_cert), str(good_key))
    site.httpd.socket = server_ctx.wrap_socket(site.httpd.socket, server_side=True)
    try:
        monkeypatch.setattr(url_fetch, "resolve", lambda host, port: ["127.0.0.1"])
        with pytest.raises(ImageInputError):   # self-signed, not in the system's trust store
            fetch(f"https://portraits.example:{site.port}/p.png", LOCAL)
    finally:
        site.close()
