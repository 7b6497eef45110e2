"""Downloading a portrait named by URL in dispatch metadata without opening this machine's network to
whoever dispatches jobs (SSRF).

- http and https only, on the first URL and on every redirect (followed here, not by a library);
- every address the host name resolves to must be public: loopback, private, link-local (cloud metadata),
  multicast, unspecified and reserved addresses are refused, unless an operator allows a network;
- the connection goes to the address that was checked (a second DNS answer cannot swap it: rebinding);
- an optional host allow-list;
- one time and size budget for the whole download, redirects included (a server sending one byte a
  second cannot hold a job's slot);
- one error text whatever went wrong (refused, unreachable, timed out, too large), naming the URL
  without its user:password or query: the worker's answers do not tell a closed port from a filtered
  one, and signed-URL secrets stay out of logs. The reason goes to the worker's own log.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from emo_stream.errors import ConfigError, ImageInputError

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class UrlPolicy:
    """Where portraits may be downloaded from, and how much one download may cost."""

    hosts: tuple[str, ...] = ()       # allowed host names; ".example.com" allows its subdomains; empty: any
    networks: tuple[str, ...] = ()    # non-public networks allowed anyway, e.g. an image server "10.1.2.0/24"
    timeout_s: float = 20.0           # the whole download: DNS, connects, redirects, headers and body
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5

    def __post_init__(self) -> None:
        for net in self.networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"image network {net!r} is not an address or network (e.g. 10.1.2.0/24)") \
                    from None
        if self.timeout_s <= 0 or self.max_bytes <= 0 or self.max_redirects < 0:
            raise ConfigError("image URL policy: timeout_s and max_bytes must be positive")

    def host_allowed(self, host: str) -> bool:
        if not self.hosts:
            return True
        host = host.lower().rstrip(".")
        for allowed in self.hosts:
            allowed = allowed.lower().rstrip(".")
            if host == allowed.lstrip(".") or allowed.startswith(".") and host.endswith(allowed):
                return True
        return False

    def address_allowed(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])   # drop an IPv6 scope id
        if any(addr in ipaddress.ip_network(net, strict=False) for net in self.networks):
            return True
        return is_public(addr)


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address (IPv6 forms that carry an IPv4 address are judged by it)."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is not None:
            addr = embedded
    return addr.is_global and not (addr.is_multicast or addr.is_private or addr.is_loopback or addr.is_link_local
                                   or addr.is_reserved or addr.is_unspecified)


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (tests replace this to make a public-looking name local)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def safe_url(url: str) -> str:
    """The URL for messages: scheme, host, port and path; no user:password, no query (signatures)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"[:200]


class _Refused(Exception):
    """The download is refused or failed: the reason is for the worker's log only."""


def fetch(url: str, policy: UrlPolicy | None = None) -> bytes:
    """The body of `url` under `policy` (default: public addresses only, 20 s, 20 MiB)."""
    policy = policy or UrlPolicy()
    if urlsplit(url).scheme not in ("http", "https"):   # the dispatcher's own mistake: say so
        raise ImageInputError(f"avatar image URL must be http(s): {safe_url(url)}")
    deadline = time.monotonic() + policy.timeout_s
    try:
        return _fetch(url, policy, deadline)
    except _Refused as exc:
        reason = str(exc)
    except (OSError, http.client.HTTPException, ValueError, UnicodeError) as exc:
        reason = f"{exc.__class__.__name__}: {exc}"
    if time.monotonic() >= deadline:
        reason = f"over the {policy.timeout_s:g} s budget ({reason})"
    log.warning("portrait %s not downloaded: %s", safe_url(url), reason)
    raise ImageInputError(
        f"could not download the avatar image {safe_url(url)}: refused, unreachable, not found, slower than "
        f"{policy.timeout_s:g} s or larger than {policy.max_bytes / 2**20:g} MiB (the worker's log says which)")


def _fetch(url: str, policy: UrlPolicy, deadline: float) -> bytes:
    first = urlsplit(url)
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _Refused(f"scheme {parts.scheme!r} (http and https only)")
        if first.scheme == "https" and parts.scheme == "http":
            raise _Refused("redirect from https to http")
        host = parts.hostname
        if not host:
            raise _Refused("no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if not policy.host_allowed(host):
            raise _Refused(f"host {host} is not in the allowed image hosts")
        ips = [host] if _is_ip(host) else _resolve(host, port, deadline)
        if not ips:
            raise _Refused(f"{host} has no address")
        refused = [ip for ip in ips if not policy.address_allowed(ip)]
        if refused:  # one private answer among public ones is a rebinding attempt, not a fallback
            raise _Refused(f"{host} resolves to a non-public address {refused[0]}")
        conn = _connect(parts.scheme, host, port, ips, deadline)
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _abort, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            headers = {"User-Agent": "emo-stream", "Accept": "image/*", "Accept-Encoding": "identity"}
            same_origin = (parts.scheme, parts.hostname, parts.port) == (first.scheme, first.hostname, first.port)
            if parts.username is not None and same_origin:   # credentials go to the URL's own origin only
                pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise _Refused(f"HTTP {resp.status} without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise _Refused(f"HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise _Refused(f"{length} bytes")
            chunks, total = [], 0
            while True:
                chunk = resp.read1(65536)   # one socket read at most: the deadline is checked between reads
                if not chunk:
                    break
                total += len(chunk)
                if total > policy.max_bytes:
                    raise _Refused(f"more than {policy.max_bytes} bytes")
                if time.monotonic() >= deadline:
                    raise _Refused("too slow")
                chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise _Refused("too slow")
            return b"".join(chunks)
        finally:
            watchdog.cancel()
            conn.close()
    raise _Refused(f"more than {policy.max_redirects} redirects")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _resolve(host: str, port: int, deadline: float) -> list[str]:
    """resolve() within the budget (getaddrinfo has no timeout of its own: it runs on a daemon thread)."""
    result: list = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(resolve(host, port))
        except Exception as exc:   # noqa: BLE001 - reported below
            result.append(exc)
        done.set()

    threading.Thread(target=run, name="portrait-dns", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise _Refused(f"no DNS answer for {host} in time")
    if isinstance(result[0], Exception):
        raise _Refused(f"DNS: {result[0]}")
    return result[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to `host` made to an address chosen (and checked) beforehand."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified for the host name (and SNI names it)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connect(scheme: str, host: str, port: int, ips: list[str], deadline: float) -> http.client.HTTPConnection:
    kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    error: Exception | None = None
    for ip in ips:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn = kind(host, port, ip, remaining)
        try:
            conn.connect()
            return conn
        except OSError as exc:
            conn.close()
            error = exc
    raise _Refused(f"cannot connect to {host}: {error or 'no time left'}")


def _abort(conn: http.client.HTTPConnection) -> None:
    """The budget is spent: end the blocked read (shutdown wakes a recv waiting in another thread)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
