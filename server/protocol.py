"""The WebSocket API's messages (/api/ws): parsing and validation of what clients send, and the
shapes of what the server sends back. docs/ws_api.md is the prose version of this file.

Client -> server text messages are JSON objects with a "type"; each type has a fixed set of
fields, checked here (unknown fields, wrong types and out-of-range values are errors, so a typo
never silently does something else). Binary messages are PCM16 audio (after "start") or the
bytes of an image announced by an "avatar" message. Frames sent to relaying bots are binary:

    4-byte big-endian N | N bytes JSON header | JPEG bytes | PCM16 LE mono audio (16 kHz)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from emo_stream.errors import EmoStreamError
from emo_stream.timeline import SAMPLE_RATE

PROTOCOL_VERSION = 1
IMAGE_TYPES = {"image/jpeg": (b"\xff\xd8\xff",), "image/png": (b"\x89PNG\r\n\x1a\n",), "image/webp": (b"RIFF",)}
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
FRAME_MAGIC_HEADER = struct.Struct(">I")


class ProtocolError(EmoStreamError):
    """A client message is malformed or not allowed now. `code` is machine readable."""

    def __init__(self, message: str, code: str = "bad_message", request: str | None = None):
        super().__init__(message)
        self.code = code
        self.request = request


@dataclass(frozen=True)
class AudioFormat:
    format: str = "pcm16"
    sample_rate: int = SAMPLE_RATE
    channels: int = 1

    @property
    def bytes_per_sample_frame(self) -> int:
        return 2 * self.channels


@dataclass(frozen=True)
class Offer:
    sdp: str
    type: str = "offer"


@dataclass(frozen=True)
class Start:
    audio: AudioFormat | None     # PCM over this WebSocket (bots); None with webrtc (mic over WebRTC)
    avatar: str | None            # an id from avatar_ready, or None for the server's default portrait
    frames: str                   # "none" | "jpeg": frames sent back over the WebSocket (relaying bots)
    jpeg_quality: int
    seed: int
    webrtc: Offer | None          # browser: SDP offer; the answer comes in session_started
    stats_interval: float | None  # push stats every N seconds (None: only on request)


@dataclass(frozen=True)
class View:
    session: str                  # a session id, or "latest"
    webrtc: Offer


@dataclass(frozen=True)
class AvatarUpload:
    content_type: str
    size: int


@dataclass(frozen=True)
class Simple:
    """end_of_segment, clear, stats, stop, ping."""

    type: str


Message = Start | View | AvatarUpload | Simple

# type -> {field: (python types, required)}
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "start": {"audio": ((dict,), False), "avatar": ((str,), False), "frames": ((str,), False),
              "jpeg_quality": ((int,), False), "seed": ((int,), False), "webrtc": ((dict,), False),
              "stats_interval": ((int, float), False)},
    "view": {"session": ((str,), True), "webrtc": ((dict,), True)},
    "avatar": {"content_type": ((str,), True), "size": ((int,), True)},
    "end_of_segment": {}, "clear": {}, "stats": {}, "stop": {}, "ping": {},
}
MESSAGE_TYPES = tuple(_FIELDS)


def parse_message(text: str | bytes, max_bytes: int, max_upload_bytes: int) -> Message:
    """One text message -> a typed message, or ProtocolError saying exactly what is wrong."""
    if len(text) > max_bytes:
        raise ProtocolError(f"message too large: {len(text)} bytes (limit {max_bytes})", "too_large")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ProtocolError("text messages must be JSON objects") from None
    if not isinstance(data, dict):
        raise ProtocolError("text messages must be JSON objects")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError('message has no "type" string')
    if kind not in _FIELDS:
        raise ProtocolError(f"unknown message type {kind!r} (known: {', '.join(MESSAGE_TYPES)})", "unknown_type", kind)
    _check_fields(kind, data, _FIELDS[kind], kind)
    if kind == "start":
        return _start(data)
    if kind == "view":
        session = data["session"]
        if not session or len(session) > 64:
            raise ProtocolError("view.session must be a session id or \"latest\"", request="view")
        return View(session=session, webrtc=_offer(data["webrtc"], "view"))
    if kind == "avatar":
        content_type = data["content_type"].lower()
        if content_type not in IMAGE_TYPES:
            raise ProtocolError(f"avatar content_type must be one of {', '.join(IMAGE_TYPES)}: got {content_type!r}",
                                "bad_image", "avatar")
        size = data["size"]
        if not 0 < size <= max_upload_bytes:
            raise ProtocolError(f"avatar size must be 1..{max_upload_bytes} bytes: got {size}", "too_large", "avatar")
        return AvatarUpload(content_type=content_type, size=size)
    return Simple(kind)


def _check_fields(kind: str, data: dict, spec: dict, where: str) -> None:
    for name in data:
        if name != "type" and name not in spec:
            known = ", ".join(spec) or "none"
            raise ProtocolError(f"{where}: unknown field {name!r} (allowed: {known})", request=kind)
    for name, (types_, required) in spec.items():
        if name not in data or data[name] is None:
            if required:
                raise ProtocolError(f"{where}: missing field {name!r}", request=kind)
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, types_):
            want = " or ".join(t.__name__ for t in types_)
            raise ProtocolError(f"{where}.{name} must be {want}, got {type(value).__name__}", request=kind)


def _offer(data: dict, kind: str) -> Offer:
    _check_fields(kind, data, {"sdp": ((str,), True), "type": ((str,), True)}, f"{kind}.webrtc")
    if data["type"] != "offer":
        raise ProtocolError(f"{kind}.webrtc.type must be \"offer\"", request=kind)
    if not data["sdp"].startswith("v=0"):
        raise ProtocolError(f"{kind}.webrtc.sdp is not an SDP offer", request=kind)
    return Offer(sdp=data["sdp"])


def _start(data: dict) -> Start:
    audio = None
    if data.get("audio") is not None:
        spec = {"format": ((str,), False), "sample_rate": ((int,), True), "channels": ((int,), False)}
        _check_fields("start", data["audio"], spec, "start.audio")
        a = data["audio"]
        if a.get("format", "pcm16") != "pcm16":
            raise ProtocolError("start.audio.format must be \"pcm16\" (16-bit little-endian signed PCM)",
                                request="start")
        if a["sample_rate"] not in SAMPLE_RATES:
            raise ProtocolError(f"start.audio.sample_rate must be one of {SAMPLE_RATES}: got {a['sample_rate']}",
                                request="start")
        channels = a.get("channels", 1)
        if channels not in (1, 2):
            raise ProtocolError(f"start.audio.channels must be 1 or 2: got {channels}", request="start")
        audio = AudioFormat(sample_rate=a["sample_rate"], channels=channels)
    webrtc = _offer(data["webrtc"], "start") if data.get("webrtc") is not None else None
    if audio is not None and webrtc is not None:
        raise ProtocolError("start: give either audio (PCM over this WebSocket) or webrtc (browser), not both",
                            request="start")
    if audio is None and webrtc is None:
        audio = AudioFormat()  # default: 16 kHz mono PCM16
    frames = data.get("frames") or "none"
    if frames not in ("none", "jpeg"):
        raise ProtocolError(f"start.frames must be \"none\" or \"jpeg\": got {frames!r}", request="start")
    quality = data.get("jpeg_quality", 80)
    if not 10 <= quality <= 95:
        raise ProtocolError(f"start.jpeg_quality must be 10..95: got {quality}", request="start")
    seed = data.get("seed", 0)
    if not 0 <= seed < 2**31:
        raise ProtocolError("start.seed must be a non-negative 31-bit integer", request="start")
    interval = data.get("stats_interval")
    if interval is not None and not 0.2 <= interval <= 60:
        raise ProtocolError(f"start.stats_interval must be 0.2..60 seconds: got {interval}", request="start")
    avatar = data.get("avatar")
    if avatar is not None and not (0 < len(avatar) <= 64):
        raise ProtocolError("start.avatar must be an id from avatar_ready", request="start")
    return Start(audio=audio, avatar=avatar, frames=frames, jpeg_quality=quality, seed=seed, webrtc=webrtc,
                 stats_interval=float(interval) if interval is not None else None)


def check_image_bytes(data: bytes, upload: AvatarUpload) -> None:
    """The announced size and the image type's magic bytes must match what arrived."""
    if len(data) != upload.size:
        raise ProtocolError(f"avatar: announced {upload.size} bytes, received {len(data)}", "bad_image", "avatar")
    if not any(data.startswith(m) for m in IMAGE_TYPES[upload.content_type]):
        raise ProtocolError(f"avatar: the data is not {upload.content_type}", "bad_image", "avatar")
    if upload.content_type == "image/webp" and data[8:12] != b"WEBP":
        raise ProtocolError("avatar: the data is not image/webp", "bad_image", "avatar")


def check_audio_chunk(data: bytes, fmt: AudioFormat, max_bytes: int) -> None:
    if not data:
        raise ProtocolError("empty audio message", "bad_audio")
    if len(data) > max_bytes:
        raise ProtocolError(f"audio message too large: {len(data)} bytes (limit {max_bytes}; send smaller chunks)",
                            "too_large")
    if len(data) % fmt.bytes_per_sample_frame:
        raise ProtocolError(f"audio message of {len(data)} bytes is not whole {fmt.channels}-channel PCM16 samples",
                            "bad_audio")


# ---- server -> client events: the one place each event's name and fields are written ----------------

SESSION_STARTED, SESSION_ENDED, VIEW_STARTED = "session_started", "session_ended", "view_started"
PLAYBACK_STARTED, PLAYBACK_FINISHED = "playback_started", "playback_finished"
CLEARED, AVATAR_READY, STATS, PONG, ERROR, FRAME = "cleared", "avatar_ready", "stats", "pong", "error", "frame"
OUTPUT_SAMPLE_RATE = SAMPLE_RATE   # audio the server sends back (bot frames), the engine's rate


def error(code: str, message: str, request: str | None = None, fatal: bool = False) -> dict:
    out = {"type": ERROR, "code": code, "message": message, "fatal": fatal}
    if request:
        out["request"] = request
    return out


def session_started(session: str, viewer_url: str, fps: int, size: int) -> dict:
    return {"type": SESSION_STARTED, "session": session, "viewer_url": viewer_url, "fps": fps, "size": size,
            "output_sample_rate": OUTPUT_SAMPLE_RATE, "protocol": PROTOCOL_VERSION}


def session_ended(reason: str) -> dict:
    return {"type": SESSION_ENDED, "reason": reason}


def view_started(session: str, answer_type: str, sdp: str, fps: int, size: int) -> dict:
    return {"type": VIEW_STARTED, "session": session, "answer": {"type": answer_type, "sdp": sdp}, "fps": fps,
            "size": size}


def playback_started(segment: int, pts: float) -> dict:
    """The first speech frame of utterance `segment` was released to the viewers."""
    return {"type": PLAYBACK_STARTED, "segment": segment, "pts": round(pts, 3)}


def playback_finished(segment: int, position: float, interrupted: bool) -> dict:
    """Utterance `segment` finished playing (`position` seconds of it were played) or was interrupted."""
    return {"type": PLAYBACK_FINISHED, "segment": segment, "position": round(position, 3), "interrupted": interrupted}


def cleared(session: str) -> dict:
    return {"type": CLEARED, "session": session}


def avatar_ready(avatar: str) -> dict:
    return {"type": AVATAR_READY, "avatar": avatar}


def stats(values: dict) -> dict:
    return {"type": STATS, **values}


def pong() -> dict:
    return {"type": PONG}


def frame_header(index: int, pts: float, speech: bool, segment_end: bool) -> dict:
    """The JSON header of a binary frame message (see encode_frame)."""
    return {"type": FRAME, "index": index, "pts": round(pts, 4), "speech": speech, "segment_end": segment_end,
            "sample_rate": OUTPUT_SAMPLE_RATE}


def encode_frame(header: dict, jpeg: bytes, pcm16: bytes) -> bytes:
    head = json.dumps({**header, "jpeg_bytes": len(jpeg), "audio_bytes": len(pcm16)}, separators=(",", ":")).encode()
    return FRAME_MAGIC_HEADER.pack(len(head)) + head + jpeg + pcm16


def decode_frame(data: bytes) -> tuple[dict, bytes, bytes]:
    """Inverse of encode_frame (used by the Python client)."""
    if len(data) < 4:
        raise ProtocolError("frame message too short", "bad_frame")
    (n,) = FRAME_MAGIC_HEADER.unpack_from(data)
    try:
        header: dict[str, Any] = json.loads(data[4:4 + n])
    except ValueError:
        raise ProtocolError("frame header is not JSON", "bad_frame") from None
    start = 4 + n
    jpeg = data[start:start + header["jpeg_bytes"]]
    pcm = data[start + header["jpeg_bytes"]:start + header["jpeg_bytes"] + header["audio_bytes"]]
    return header, jpeg, pcm
