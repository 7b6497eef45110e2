"""Server settings: configs/server.yaml -> dataclasses, validated once here (bad config -> ConfigError)."""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_stream.backends import backend_names, default_backend, names_phrase
from emo_stream.config_io import build_dataclass, read_yaml
from emo_stream.errors import ConfigError
from emo_stream.resources import resource_dir

DEFAULT_CONFIG = resource_dir("configs") / "server.yaml"


@dataclass
class SessionsConfig:
    max_sessions: int = 4
    idle_timeout_s: float = 300.0
    mic_max_backlog_s: float = 1.0
    mic_jitter_packets: int = 1  # mic packets aiortc holds before decoding (its default 4 = 80 ms)
    max_viewers: int = 16   # WebRTC viewers per session (each costs one video encode)


@dataclass
class EngineSettings:
    """Forwarded to emo_stream.streaming.EngineConfig (max_sessions comes from `sessions`)."""

    segment_frames: int | None = None  # None: the backend's stream_segment_frames (preview 1, EMO 8)
    max_batch: int = 4
    input_seconds: float = 30.0
    output_frames: int = 50
    vad: bool = True


@dataclass
class LimitsConfig:
    max_audio_chunk_bytes: int = 256 * 1024
    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_text_bytes: int = 64 * 1024
    max_avatars: int = 16


@dataclass
class PlayoutConfig:
    video_queue_frames: int = 3
    audio_queue_chunks: int = 10
    late_tolerance_s: float = 0.12
    webrtc_video_delay_ms: float = 75.0  # WebRTC video sent this much after its audio (lip alignment)
    stats_interval_s: float = 1.0


@dataclass
class KeepaliveConfig:
    ping_interval_s: float = 1.0
    ping_timeout_s: float = 1.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    public_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    backend: str | None = None  # None: emo when a model is set, else preview (with a notice)
    model: str | None = None
    avatar: str | None = None
    size: int = 512
    fps: int = 25
    device: str | None = None
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    ZERO_ALLOWED = frozenset({"webrtc_video_delay_ms"})  # numeric settings where 0 means "off"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    playout: PlayoutConfig = field(default_factory=PlayoutConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def auth_required(self) -> bool:
        return bool(self.token) or not self.loopback

    def ensure_token(self) -> None:
        """Binding beyond loopback without a token would expose the mic/avatar API: make one up."""
        if not self.token and not self.loopback:
            self.token = secrets.token_urlsafe(18)

    def validate(self) -> "ServerConfig":
        _positive(self, "port", allow_zero=True)
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535: got {self.port}")
        if self.backend is not None and self.backend not in backend_names():
            raise ConfigError(f"backend must be {names_phrase()}: got {self.backend!r}")
        if not 16 <= self.size <= 2048 or self.size % 2:
            raise ConfigError(f"size must be an even number of pixels in 16..2048: got {self.size}")
        if self.fps <= 0 or 16000 % self.fps or 90000 % self.fps or 48000 % self.fps:
            raise ConfigError(f"fps must divide 16000, 48000 and 90000 (e.g. 25, 20, 10): got {self.fps}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both (PEM files) or neither")
        for name in ("tls_cert", "tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}: file not found: {value}")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("token must be at least 8 characters")
        for section in (self.sessions, self.engine, self.limits, self.playout, self.keepalive):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                zero_ok = f.name in self.ZERO_ALLOWED
                if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                        value < 0 or value == 0 and not zero_ok):
                    raise ConfigError(f"{type(section).__name__}.{f.name} must be positive: got {value}")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(obj: Any, name: str, allow_zero: bool = False) -> None:
    value = getattr(obj, name)
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be positive: got {value}")


def load_config(path: str | Path | None = None, **overrides: Any) -> ServerConfig:
    """Read a YAML file (default configs/server.yaml) and apply non-None `overrides` (CLI flags)."""
    source = Path(path) if path else DEFAULT_CONFIG
    from_file = bool(path) or source.is_file()
    data = read_yaml(source, "config file") if from_file else {}
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    if overrides.get("model") and "backend" not in {k for k, v in overrides.items() if v is not None}:
        data["backend"] = default_backend(overrides["model"])  # --model alone means the model backend
    return build_dataclass(ServerConfig, data, str(source) if from_file else "server settings").validate()
