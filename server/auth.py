"""Who may use the server: tokens and what they grant, the wrong-token limiter, the client's address
behind trusted proxies, the Host allow-list of loopback mode, and keeping secrets out of logs.
docs/security.md states the model these implement.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit

from emo_stream.errors import ConfigError

ADMIN = "admin"     # the master token: pages, the whole API, health details
VIEWER = "viewer"   # the viewer token: the viewer page and `view` on the WebSocket, nothing else
MIN_TOKEN_BITS = 128


# -- tokens ------------------------------------------------------------------------------------------

URLSAFE = frozenset(string.ascii_letters + string.digits + "-_")   # secrets.token_urlsafe's (base64url) alphabet


def token_bits(token: str) -> float:
    """A generous estimate of a token's entropy: its length times log2 of the alphabet its character
    classes span (hex digits count as 16 symbols), the alphabet no larger than the square of the number
    of distinct characters (33 times "a" is no strong token). A token that looks drawn from the URL-safe
    base64 alphabet (secrets.token_urlsafe: see `_looks_urlsafe_random`) counts 6 bits a character, even
    when it happens to miss a class: a 22-character token_urlsafe(16) without digits, - or _ holds 128 bits,
    not the 125 its 52 letters alone would give."""
    chars = set(token)
    if chars <= set("0123456789abcdef") or chars <= set("0123456789ABCDEF"):
        alphabet = 16
    else:
        alphabet = sum(size for cls, size in ((string.digits, 10), (string.ascii_lowercase, 26),
                                              (string.ascii_uppercase, 26)) if chars & set(cls))
        if chars - set(string.ascii_letters + string.digits):
            alphabet += 32
    alphabet = min(alphabet, max(len(chars), 2) ** 2)
    bits = len(token) * math.log2(max(alphabet, 2))
    return max(bits, 6.0 * len(token)) if _looks_urlsafe_random(token) else bits


def _looks_urlsafe_random(token: str) -> bool:
    """Whether `token` plausibly is a uniform draw from the 64 URL-safe symbols. Each check below refuses a
    real token_urlsafe output of up to a few hundred characters with a chance under 1e-9, and refuses what
    people type: few distinct symbols for the length (repeats), 9 characters in a row each equal or next to
    the one before ("0123456789", "aaaaaaaaa", "zyxwvutsr"; 11 when case is ignored: "AbCdEfGhIjK"), an
    8-character piece that comes back, and text in one case (no capital, or no small letter). A random draw
    of 22 misses a case about 1 time in 45,000 and then keeps the class estimate, which still passes it
    unless it also lacks - and _ (small letters and digits only: 114 bits, as such a password holds; about 1
    token_urlsafe(16) in 150,000; 32 characters, token_urlsafe(24), always pass). Words in mixed case are not
    recognised: they count what their length gives, as they did under the class estimate."""
    n = len(token)
    if n < 16 or not set(token) <= URLSAFE:
        return False
    if not (re.search("[a-z]", token) and re.search("[A-Z]", token)):
        return False
    expected = 64 * (1 - (63 / 64) ** n)        # distinct symbols n uniform draws show on average
    if len(set(token)) < math.ceil(0.45 * expected):   # e.g. n=22: under 9 of the expected 18.7 (p < 1e-10)
        return False
    run = folded = 0
    for a, b in zip(token, token[1:]):
        run = run + 1 if abs(ord(a) - ord(b)) <= 1 else 0
        folded = folded + 1 if abs(ord(a.lower()) - ord(b.lower())) <= 1 else 0
        # p ~ 3/64 a step: 8 in a row ~ 2e-11 a place; case folded ("AbCdEf...") ~ 0.085: 10 in a row ~ 2e-11
        if run >= 8 or folded >= 10:
            return False
    pieces = [token[i:i + 8] for i in range(n - 7)]
    return len(set(pieces)) == len(pieces)      # p ~ n^2/2 x 64^-8


def check_token(name: str, token: str | None) -> None:
    """User-chosen tokens must be unguessable online: at least 128 bits (22 random URL-safe characters)."""
    if token is None:
        return
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise ConfigError(f"{name} is too weak (about {bits:.0f} bits, at least {MIN_TOKEN_BITS} needed): use 22 or "
                          f"more random characters, e.g. python -c \"import secrets; print(secrets.token_urlsafe(24))\"")


def derive_viewer_token(token: str) -> str:
    """The default viewer token: fixed for a given master token (an OBS source keeps working across
    restarts), and revealing nothing about it."""
    digest = hmac.new(token.encode(), b"emo-stream viewer token", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")[:32]


def read_secret(*, flag: str | None, flag_name: str, file: str | None, file_flag: str, env: str,
                what: str) -> str | None:
    """A secret from --x-file, then the environment, then --x (which other users see in `ps`: warned)."""
    if file:
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{file_flag} {file}: {exc.strerror or exc}") from None
        if not value:
            raise ConfigError(f"{file_flag} {file}: the file is empty")
        return value
    if flag:
        print(f"warning: {flag_name} puts the {what} in the process list, where other users of this machine "
              f"can read it: use {file_flag} or ${env} instead", file=sys.stderr, flush=True)
        return flag
    return os.environ.get(env) or None


def query_params(request_path: str) -> dict[str, list[str]]:
    """The request's query parameters, names and values percent-decoded (as the token check reads them)."""
    return parse_qs(urlsplit(request_path).query, keep_blank_values=True)


def given_token(headers: Any, query: dict[str, list[str]]) -> str | None:
    """The token a request carries (Authorization: Bearer wins over ?token=); "" for another kind of
    Authorization (a wrong token all the same); None when it carries none (a link opened without it)."""
    auth = headers.get("Authorization")
    if auth is not None and auth[:7].lower() == "bearer ":   # the scheme is case-insensitive (RFC 9110)
        return auth[7:].strip()
    values = query.get("token")
    if values:
        return values[0]
    return "" if auth is not None else None


def same(given: str | None, token: str | None) -> bool:
    return given is not None and token is not None and hmac.compare_digest(given.encode(), token.encode())


# -- the client's address ----------------------------------------------------------------------------

def parse_networks(name: str, items: Iterable[str]) -> tuple:
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an address or network (e.g. 127.0.0.1 or 10.0.0.0/8)") \
                from None
    return tuple(nets)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: list[str], trusted: tuple) -> str:
    """The client's address: the TCP peer, or - when the peer is a trusted proxy - the nearest address in
    X-Forwarded-For that is not a trusted proxy (hops further left are the client's to write)."""
    ip = _ip(peer)
    if ip is None or not trusted or not any(ip in net for net in trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            return peer   # garbage from the proxy's side: the proxy is the best we know
        if not any(hop_ip in net for net in trusted):
            return str(hop_ip)
    return str(_ip(hops[0])) if hops else peer


def limiter_key(address: str) -> str:
    """IPv6 clients are counted by /64 (one host commonly holds the whole prefix), IPv4 by address."""
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address) and not ip.ipv4_mapped:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip) if ip else address


# -- the wrong-token limiter -------------------------------------------------------------------------

@dataclass
class _Gate:
    next_at: float = 0.0
    waiting: int = 0


class WrongTokenLimiter:
    """Slows token guessing per client address without locking out the holder of the token.

    An address may send `attempts` wrong tokens per `window_s` at full speed. Past that, its requests
    that carry a token are checked one at a time, one per `interval_s`, in arrival order; at most
    `max_waiting` wait (more are refused with 429 unchecked). So a guesser gets one guess per interval
    however many connections it opens, while the right token - from the same address too - gets in
    after a short wait, and a success clears the address's count. Bounded memory."""

    MAX_ADDRESSES = 4096
    MAX_WAITING_TOTAL = 256

    def __init__(self, attempts: int = 10, window_s: float = 60.0, interval_s: float = 1.0, max_waiting: int = 4,
                 clock: Callable[[], float] = time.monotonic):
        self.attempts = attempts
        self.window_s = window_s
        self.interval_s = interval_s
        self.max_waiting = max_waiting
        self.clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._gates: dict[str, _Gate] = {}
        self._waiting = 0

    def _recent(self, key: str) -> collections.deque[float]:
        now = self.clock()
        times = self._failures.get(key, collections.deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def limited(self, address: str) -> bool:
        return len(self._recent(limiter_key(address))) >= self.attempts

    async def admit(self, address: str) -> float:
        """Wait for this address's turn to have a token checked: 0.0 when it may go on now (after any
        wait), else the seconds to put in Retry-After (the request is refused without a check)."""
        key = limiter_key(address)
        if len(self._recent(key)) < self.attempts:
            return 0.0
        gate = self._gates.setdefault(key, _Gate())
        if gate.waiting >= self.max_waiting or self._waiting >= self.MAX_WAITING_TOTAL:
            return max(1.0, (gate.waiting + 1) * self.interval_s)
        now = self.clock()
        at = max(now, gate.next_at)
        gate.next_at = at + self.interval_s   # this request's slot is taken now: concurrent ones line up
        gate.waiting += 1
        self._waiting += 1
        try:
            if at > now:
                await asyncio.sleep(at - now)
        finally:
            gate.waiting -= 1
            self._waiting -= 1
        return 0.0

    def failed(self, address: str) -> None:
        key = limiter_key(address)
        times = self._recent(key)
        times.append(self.clock())
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > self.MAX_ADDRESSES:
            old, _ = self._failures.popitem(last=False)
            gate = self._gates.get(old)
            if gate is not None and not gate.waiting:
                del self._gates[old]

    def succeeded(self, address: str) -> None:
        """The right token came from this address: its holder is not slowed any more."""
        key = limiter_key(address)
        self._failures.pop(key, None)
        gate = self._gates.get(key)
        if gate is not None and not gate.waiting:
            del self._gates[key]


# -- Host allow-list (loopback mode) -----------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def split_host(host: str) -> tuple[str, int | None]:
    """'name:port' / '[v6]:port' / 'name' -> (lower-case name, port or None); ('', None) when unreadable."""
    host = host.strip().lower()
    m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?", host)
    if not m:
        return "", None
    return m.group(1), int(m.group(2)) if m.group(2) else None


def host_allowed(host: str | None, port: int, tls: bool, names: Iterable[str]) -> bool:
    """In loopback mode a page from another site could reach us by a DNS name that resolves to 127.0.0.1
    (DNS rebinding): only our loopback names at our port, and names the operator lists, are answered."""
    if not host:
        return False
    name, given_port = split_host(host)
    if not name:
        return False
    if name in LOOPBACK_NAMES:
        return given_port == port or given_port is None and port == (443 if tls else 80)
    return name in {n.lower() for n in names}


# -- secrets out of logs -----------------------------------------------------------------------------

_QUERY_PARAM = re.compile(r"([?&;])([^=&;\s#?]*)=([^&;\s#]*)")
_AUTH_HEADER = re.compile(r"(?im)^([<>]?\s*authorization:\s*)(.*)$")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without the given secrets, token= query values (however the name is spelled) and
    Authorization header values."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")

    def param(m: re.Match) -> str:
        name = unquote(m.group(2)).lower()
        return f"{m.group(1)}{m.group(2)}=[redacted]" if name == "token" else m.group(0)

    text = _QUERY_PARAM.sub(param, text)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + "[redacted]", text)


class RedactingLogger(logging.LoggerAdapter):
    """websockets' access log (`-v` logs request lines and headers) without tokens."""

    def __init__(self, logger: logging.Logger, secrets: Callable[[], Iterable[str | None]]):
        super().__init__(logger, {})
        self.secrets = secrets

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = " ".join(map(str, (msg, *args)))
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, "%s", redact(text, self.secrets()), **kwargs)
