"""Value types of the streaming engine: its configuration, the frames it emits, avatar handles, errors,
the segment jobs its stages pass along, and the narrow interface a session sees of its engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from emo_stream.backend import AudioContext, SegmentJob
from emo_stream.errors import ConfigError, EmoStreamError
from emo_stream.streaming.window import Cut


class EngineFullError(EmoStreamError):
    """Every session slot of the engine is taken; the caller should retry later or use another server."""


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""


class MonotonicClock:
    """The default clock: time.monotonic(). Tests inject a fake one with the same .now()."""

    def now(self) -> float:
        return time.monotonic()


@dataclass
class EngineConfig:
    """Knobs of the streaming engine. Validated once here (ConfigError on bad values)."""

    segment_frames: int = 8          # frames per generated segment: the latency/quality knob
    max_sessions: int = 4            # open_session beyond this raises EngineFullError
    max_batch: int = 4               # sessions batched into one backend call
    generate_workers: int | None = None  # parallel generator threads (default: 2 for backends declaring
                                         # concurrent_generate; else 1)
    input_seconds: float = 30.0      # queued input audio per session before push_audio awaits
    output_frames: int = 50          # generated-but-undelivered frames per session (incl. in flight)
    idle_lead_frames: int | None = None  # idle frames generated at most this far ahead (default segment+2)
    vad: bool = True                 # silero-vad; False: a cheap energy detector
    cuda_streams: bool = True        # backend on CUDA: one stream per stage so their kernels overlap
    vad_threshold: float = 0.5       # silero speech probability threshold
    energy_threshold_db: float = -45.0  # energy detector threshold (dBFS RMS) when vad=False
    vad_hangover_ms: float = 200.0   # a segment this close after speech is still rendered as speech
    max_delay_ms: float = 1000.0     # fall-behind policy: segments due longer ago than this are held
    late_ms: float = 200.0           # a frame ready more than this after its due time counts as late
    gap_fill_ms: float = 60.0        # timestamp gaps longer than this are filled with silence
    max_gap_s: float = 2.0           # ... up to this much silence per gap
    stall_flush_s: float = 1.0       # partial speech with no new audio for this long is flushed
    clear_hold_frames: int = 2       # after clear(): idle frames holding the last picture, emitted at once
    max_avatars: int = 16            # prepared avatars kept in the cache (unused ones are evicted)
    latency_window: int = 1000       # frames kept for latency percentiles
    call_timeout_s: float = 60.0     # watchdog: a backend call running longer fails its sessions and reports the
                                     # engine stalled (emo_stream.streaming.faults)
    unhealthy_after_failures: int = 3  # this many failed backend calls in a row: a device error (unhealthy)
    stop_join_s: float = 10.0        # stop(): how long to wait for a stage thread still inside a backend call

    def __post_init__(self) -> None:
        ints = {"segment_frames": 1, "max_sessions": 1, "max_batch": 1, "output_frames": 1, "max_avatars": 1,
                "latency_window": 10, "unhealthy_after_failures": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"engine {name} must be an integer >= {low}: got {value!r}")
        if not isinstance(self.clear_hold_frames, int) or not 0 <= self.clear_hold_frames <= 25:
            raise ConfigError(f"engine clear_hold_frames must be an integer in 0..25: got {self.clear_hold_frames!r}")
        if self.output_frames < self.segment_frames:
            raise ConfigError(f"engine output_frames ({self.output_frames}) must be >= segment_frames "
                              f"({self.segment_frames})")
        if self.generate_workers is not None and (not isinstance(self.generate_workers, int)
                                                  or not 1 <= self.generate_workers <= 64):
            raise ConfigError(f"engine generate_workers must be an integer 1-64: got {self.generate_workers!r}")
        if self.idle_lead_frames is not None and (not isinstance(self.idle_lead_frames, int)
                                                  or self.idle_lead_frames < 1):
            raise ConfigError(f"engine idle_lead_frames must be a positive integer: got {self.idle_lead_frames!r}")
        if not float(self.stop_join_s) >= 0:
            raise ConfigError(f"engine stop_join_s must be >= 0: got {self.stop_join_s!r}")
        for name in ("input_seconds", "max_delay_ms", "late_ms", "stall_flush_s", "call_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"engine {name} must be > 0: got {getattr(self, name)!r}")
        if not 0 < self.vad_threshold < 1:
            raise ConfigError(f"engine vad_threshold must be in (0, 1): got {self.vad_threshold!r}")

    @property
    def lead_frames(self) -> int:
        return self.idle_lead_frames if self.idle_lead_frames is not None else self.segment_frames + 2


@dataclass(frozen=True, eq=False)
class AvatarHandle:
    """A prepared portrait, shared by every session that uses it. `avatar` is the backend's object."""

    id: str
    avatar: Any = field(repr=False)
    image_shape: tuple[int, ...] = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AvatarHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True, eq=False)
class OutputFrame:
    """One frame of a session's 25 fps timeline and the exact audio it covers."""

    index: int                  # 0, 1, 2, ... consecutive, never skipped
    pts: float                  # index / fps: seconds on the session's audio clock
    image: np.ndarray           # (size, size, 3) uint8 RGB
    audio: np.ndarray           # float32 16 kHz mono, 16000 / fps samples (zeros when idle)
    speech: bool                # from pushed audio (True) or idle fill (False)
    segment_end: bool = False   # last frame of an utterance closed by end_of_speech
    voiced: bool = False        # VAD heard speech in this frame's segment (rendered with audio features)
    dropped: bool = False       # fall-behind policy: held (previous image repeated) instead of generated


class JobOwner(Protocol):
    """What the engine's stages need of the session a job belongs to (StreamSession implements it)."""

    id: str

    def job_is_stale(self, job: "Job") -> bool: ...

    def deliver(self, job: "Job", images: np.ndarray | None) -> None: ...

    def discard(self, job: "Job") -> None: ...

    def fail(self, exc: BaseException) -> None: ...


@dataclass(eq=False)
class Job:
    """A segment of one session on its way through the engine's stages."""

    session: JobOwner
    epoch: int
    first_index: int
    num_frames: int
    due: np.ndarray                 # per-frame due times (clock seconds)
    speech: bool                    # frames carry pushed audio
    voiced: bool = False            # rendered with audio features (VAD heard speech)
    hold: bool = False              # fall-behind policy: repeat the previous image, no backend call
    cut: Cut | None = None
    segment_end: bool = False
    features: Any = None
    segment: SegmentJob | None = field(default=None, repr=False)
    event: Any = field(default=None, repr=False)   # CUDA event after the last stage's work (GPU backends)

    def stale(self) -> bool:
        return self.session.job_is_stale(self)


class SessionHost(Protocol):
    """The narrow view a StreamSession has of the engine that runs it (StreamingEngine implements it)."""

    config: EngineConfig
    clock: Clock
    fps: int
    frame_size: int                 # the backend's output width and height
    audio_context: AudioContext     # the backend's audio context

    def wake(self) -> None:
        """Something changed (audio pushed, frames read, a slot freed): plan again now."""

    def release(self, session: Any) -> None:
        """The session closed: free its slot."""
