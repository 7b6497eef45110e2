"""Server settings: configs/server.yaml -> dataclasses, validated once here (bad config -> ConfigError)."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emo_stream.registry import family_names, default_backend, model_options, names_phrase
from emo_stream.config_io import build_dataclass, read_yaml
from emo_stream.errors import ConfigError
from emo_stream.resources import resource_dir
from emo_stream.streaming.types import EngineConfig
from emo_stream.timeline import SAMPLE_RATE

from server.sync import AUDIO_RATE, VIDEO_CLOCK_RATE

if TYPE_CHECKING:
    from emo_stream.portrait_pool import PoolLimits

DEFAULT_CONFIG = resource_dir("configs") / "server.yaml"


@dataclass
class SessionsConfig:
    max_sessions: int | None = None   # None: from the device's memory and compute on CUDA, else 4
    # (emo_stream.streaming.capacity): auto (a start-up calibration of the compute on CUDA, cached), on (also
    # off CUDA), off (memory only), refresh (calibrate again, not from the cache)
    calibrate: str = "auto"
    idle_timeout_s: float = 300.0
    mic_max_backlog_s: float = 1.0
    mic_jitter_packets: int = 1  # mic packets aiortc holds before decoding (its default 4 = 80 ms)
    max_viewers: int = 16   # WebRTC viewers per session (each costs one video encode)


@dataclass
class EngineSettings(EngineConfig):
    """The `engine:` section: every emo_stream.streaming.EngineConfig setting, with its defaults and its
    validation, read from there (not repeated here). Two differences: segment_frames may be empty (the
    backend's stream_segment_frames), and max_sessions / max_avatars come from `sessions` / `limits`."""

    segment_frames: int | None = None   # type: ignore[assignment]  (None: the backend's choice)

    def __post_init__(self) -> None:
        for name, section in (("max_sessions", "sessions"), ("max_avatars", "limits")):
            if getattr(self, name) != getattr(EngineConfig, name):
                raise ConfigError(f"engine.{name}: set {section}.{name} instead")
        self.engine_config(1 if self.segment_frames is None else self.segment_frames, 1, 1)   # EngineConfig's checks

    def engine_config(self, segment_frames: int, max_sessions: int, max_avatars: int) -> EngineConfig:
        """The EngineConfig for a backend, with the server's session and avatar limits."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}
        values.update(segment_frames=segment_frames, max_sessions=max_sessions, max_avatars=max_avatars)
        return EngineConfig(**values)


@dataclass
class LimitsConfig:
    max_audio_chunk_bytes: int = 256 * 1024
    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_text_bytes: int = 64 * 1024
    max_avatars: int = 16
    # kernel send buffer of a connection receiving JPEG frames: a slow reader's frames then wait in the
    # server's outbox, where the oldest are dropped (and counted), not stale in socket buffers
    frames_send_buffer_bytes: int = 256 * 1024
    # open WebSocket connections from one client address (a talk page or a bot needs one, a viewer one
    # more): one host cannot take every file descriptor and peer connection of the server
    max_connections_per_address: int = 32
    # avatars: a connection holds at most this many of the max_avatars places (its own oldest goes when it
    # uploads more; another client's uploads never drop them while it stays connected)
    max_avatars_per_client: int = 4
    avatar_uploads_per_minute: float = 12.0   # per client address (a burst of that many, then refilled)
    # untrusted images (uploads) are decoded in separate low-priority processes (emo_stream.portrait_pool)
    decode_workers: int = 1          # processes; each uses at most one core
    decode_queue: int = 4            # uploads waiting behind them; more get a "busy" error
    decode_timeout_s: float = 30.0   # a decode (with face detection) still running then is killed
    decode_memory_mb: int = 1024     # address space a decode may use beyond the worker's own

    def pool_limits(self) -> "PoolLimits":
        from emo_stream.portrait_pool import PoolLimits

        return PoolLimits(workers=self.decode_workers, max_waiting=self.decode_queue,
                          timeout_s=self.decode_timeout_s, memory_mb=self.decode_memory_mb)


@dataclass
class PlayoutConfig:
    video_queue_frames: int = 3
    audio_queue_chunks: int = 10
    late_tolerance_s: float = 0.12
    webrtc_video_delay_ms: float = 0.0   # WebRTC picture shown this much after its sound (sender-report bias)
    # WebRTC frames sent this much after their release (not the first): a browser's audio sits 40-200 ms in its
    # jitter buffer and output; Chromium's lip sync delays the picture to match only after 5-20 s, and until then
    # the picture led the sound by that much. Held back, the picture starts near its sound. docs/reliability.md
    webrtc_video_hold_ms: float = 50.0
    stats_interval_s: float = 1.0

    def webrtc_video_frames(self) -> int:
        """A WebRTC video subscription's queue: the frames it may hold besides those held back (up to 50 fps)."""
        return self.video_queue_frames + math.ceil(self.webrtc_video_hold_ms / 20)


@dataclass
class KeepaliveConfig:
    ping_interval_s: float = 1.0
    ping_timeout_s: float = 1.0
    # a connection receiving JPEG frames answers pings late when its client reads slowly (the ping waits
    # behind unread frames): it may take this long; one that answers nothing for this long stopped reading
    reader_timeout_s: float = 10.0
    close_timeout_s: float = 1.0  # closing handshake with a client that may never answer it


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)         # master token: pages, API, health details
    viewer_token: str | None = field(default=None, repr=False)  # view only (default: derived from token)
    public_url: str | None = None
    # addresses of reverse proxies whose X-Forwarded-For names the client (the wrong-token limiter and
    # the ICE policy use the client's address); empty: the TCP peer is the client
    trusted_proxies: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)     # Host names answered in loopback mode
    tls_cert: str | None = None
    tls_key: str | None = None
    backend: str | None = None  # None: emo when a model is set, else preview (with a notice)
    model: str | None = None
    avatar: str | None = None
    size: int = 512
    fps: int = 25
    device: str | None = None
    # sampling settings of the model backends (None: the model's own defaults; see `emo-stream generate`)
    steps: int | None = None
    guidance: float | None = None
    decoder: str | None = None   # vae | taesd
    weights: str | None = None   # EchoMimic weights set of a folder holding both: acc | normal
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    ZERO_ALLOWED = frozenset({"webrtc_video_delay_ms", "webrtc_video_hold_ms"})  # numeric settings where 0 means "off"
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
        if self.backend is not None and self.backend not in family_names():
            raise ConfigError(f"backend must be {names_phrase()}: got {self.backend!r}")
        model_options(self.backend or "preview", steps=self.steps, guidance=self.guidance, decoder=self.decoder,
                      weights=self.weights)   # the same checks and messages as generate's flags
        if not 16 <= self.size <= 2048 or self.size % 2:
            raise ConfigError(f"size must be an even number of pixels in 16..2048: got {self.size}")
        rates = (SAMPLE_RATE, AUDIO_RATE, VIDEO_CLOCK_RATE)   # engine audio, WebRTC audio, RTP video clock
        if self.fps <= 0 or any(rate % self.fps for rate in rates):
            raise ConfigError(f"fps must divide {', '.join(map(str, sorted(rates)))} (e.g. 25, 20, 10): got {self.fps}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both (PEM files) or neither")
        for name in ("tls_cert", "tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}: file not found: {value}")
        from server.auth import check_token, parse_networks

        check_token("token", self.token)
        check_token("viewer_token", self.viewer_token)
        if self.viewer_token and self.viewer_token == self.token:
            raise ConfigError("viewer_token must differ from token (it grants viewing only)")
        parse_networks("trusted_proxies", self.trusted_proxies)
        from emo_stream.streaming.capacity import MODES

        if self.sessions.calibrate not in MODES:
            raise ConfigError(f"sessions.calibrate must be one of {', '.join(MODES)}: got {self.sessions.calibrate!r}")
        self.engine.__post_init__()   # re-checked: flags may have changed it since loading
        for section in (self.sessions, self.limits, self.playout, self.keepalive):
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
