"""The address of an emo-stream server's WebSocket bot API (/api/ws, docs/ws_api.md), from what a user types:
one rule for its two clients, server.bot_client and emo_stream.pipecat's RemoteAvatar (emo_stream imports
no server code, so it lives here)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from emo_stream.errors import EmoStreamError


def bot_api_url(url: str, error: type[EmoStreamError] = EmoStreamError) -> str:
    """http(s)://host:port[/...], ws(s)://... or host:port -> the ws(s) URL of /api/ws (a path given is kept);
    anything else (another scheme, no host) raises `error`."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise error(f"not an emo-stream server URL: {url}")
    path = parts.path if parts.path not in ("", "/") else "/api/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))
