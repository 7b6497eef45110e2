"""Which ICE candidates an offer may make this server probe, and which of its own addresses an answer shows.

Every remote candidate in an offer is a destination the server sends STUN checks to: left alone, one
offer with 300 candidates made the server send packets to 300 addresses of the client's choosing (its
own loopback services, the LAN, cloud metadata). And aiortc's answer lists every interface address
of the server. The policy (docs/security.md):

- offers: at most MAX_PER_SECTION candidates per media section and MAX_PER_OFFER in all (a browser
  sends a handful); UDP only (aiortc speaks no ICE-TCP); never unspecified, multicast, broadcast,
  link-local or reserved addresses, nor port 0 or names other than mDNS ".local" ones; and no
  address narrower than the client's own: loopback candidates only from a client on this machine,
  private (LAN) ones and mDNS names only from a client on a loopback or private address;
- answers: the address the client reached us at, when it is among our candidates; otherwise, for a
  client on this machine, all (it can list the interfaces itself); otherwise only candidates as wide
  as the client's address (a client on the internet learns no private address of ours).
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)

MAX_PER_SECTION = 16
MAX_PER_OFFER = 32
LOOPBACK, PRIVATE, GLOBAL = 0, 1, 2


def _ip(text: str | None):
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip


def scope(address: str | None) -> int:
    """LOOPBACK, PRIVATE or GLOBAL; an unknown address counts as GLOBAL (the strictest for offers)."""
    ip = _ip(address)
    if ip is None:
        return GLOBAL
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_private or ip in _SHARED:
        return PRIVATE
    return GLOBAL


_SHARED = ipaddress.ip_network("100.64.0.0/10")   # carrier-grade NAT: a provider's private space


def _never(ip) -> bool:
    return (ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved
            or ip == ipaddress.IPv4Address("255.255.255.255"))


def remote_candidate_allowed(line: str, peer: str | None) -> bool:
    """`a=candidate:...` of an offer: may the server send checks there, for a client at `peer`?"""
    fields = line.split(":", 1)[1].split() if ":" in line else []
    if len(fields) < 8 or fields[6] != "typ":
        return False
    transport, address, port = fields[2].lower(), fields[4], fields[5]
    if transport != "udp" or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    peer_scope = scope(peer)
    ip = _ip(address)
    if ip is None:   # a host name: only mDNS names of the client's own network
        return address.lower().endswith(".local") and peer_scope <= PRIVATE
    if _never(ip):
        return False
    return scope(address) >= peer_scope


def filter_offer(sdp: str, peer: str | None) -> str:
    """The offer with the candidates the policy allows (in order, up to the counts)."""
    out, kept, dropped, in_section = [], 0, 0, 0
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_section = 0
        if line.startswith("a=candidate:"):
            if in_section >= MAX_PER_SECTION or kept >= MAX_PER_OFFER or not remote_candidate_allowed(line, peer):
                dropped += 1
                continue
            in_section += 1
            kept += 1
        out.append(line)
    if dropped:
        log.info("offer from %s: %d ICE candidates ignored (policy: docs/security.md), %d kept", peer, dropped, kept)
    return "\r\n".join(out) + "\r\n"


def filter_answer(sdp: str, peer: str | None, local: str | None) -> str:
    """Our answer with only the candidates the client needs; c= and m= follow the first one kept."""
    sections = _sections(sdp)
    candidates = [line for section in sections for line in section if line.startswith("a=candidate:")]
    addresses = {_candidate_address(line) for line in candidates}
    local_ip = _ip(local)
    reached = str(local_ip) if local_ip is not None and not (local_ip.is_loopback or local_ip.is_unspecified) \
        and str(local_ip) in addresses else None
    if reached is None and scope(peer) == LOOPBACK:
        return sdp
    wanted = scope(peer)

    def keep(address: str) -> bool:
        if reached is not None:
            return address == reached   # the address the client already uses
        return _ip(address) is not None and scope(address) >= wanted
    out = []
    for section in sections:
        kept = [line for line in section if line.startswith("a=candidate:") and keep(_candidate_address(line))]
        for line in section:
            if line.startswith("a=candidate:") and line not in kept:
                continue
            if line.startswith("c=IN ") and section[0].startswith("m="):
                line = _connection_line(kept)
            elif line.startswith("m=") and not kept and any(l.startswith("a=candidate:") for l in section):
                parts = line.split(" ")
                line = " ".join([parts[0], "9", *parts[2:]])
            elif line.startswith("m=") and kept:
                parts = line.split(" ")
                line = " ".join([parts[0], kept[0].split()[5], *parts[2:]])
            out.append(line)
    return "\r\n".join(out) + "\r\n"


def _sections(sdp: str) -> list[list[str]]:
    sections: list[list[str]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    return sections


def _candidate_address(line: str) -> str:
    fields = line.split(":", 1)[1].split()
    return str(_ip(fields[4]) or fields[4]) if len(fields) > 4 else ""


def _connection_line(kept: list[str]) -> str:
    if not kept:
        return "c=IN IP4 0.0.0.0"
    ip = _ip(_candidate_address(kept[0]))
    return f"c=IN IP{6 if ip is not None and ip.version == 6 else 4} {ip}"
