"""The `synctest` backend: a broadcast-style A/V sync test pattern instead of a face.

Every frame is drawn from the audio it is sent with (that frame's own 16 kHz samples, nothing else):

    flash    the top three quarters of the frame, one grey level: brightness = the mean absolute amplitude of
             the frame's samples, linear (a full-scale sine is white, silence black). A beep that starts a
             fraction f into frame k lights frame k at (1 - f) of the level of frame k + 1, so the onset is
             known to a fraction of a frame from two frames: onset = start of frame k + (1 - b_k / b_k+1) / fps.
    counter  the bottom quarter: 16 black/white blocks (2 rows of 8, most significant bit first), the
             number of frames this session's backend state has generated, mod 2**16: a reader tells a
             repeated or dropped frame from a new one after any lossy codec.

Measuring tools (bench/av_sync.py, tests/test_av_sync.py) read it back with `read_pattern` and compare the
flash onsets with the sound's. It needs no face, no model and about a millisecond per 512 px frame, so it
also serves as the cheap backend of long soak runs (bench/soak.py).

It renders only what the engine gives it features for: segments the voice detector calls speech. A pure tone
is no speech to silero-vad, so sync runs with beeps use the energy detector (engine `vad: false`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from emo_stream.backend import AudioContext, SegmentJob
from emo_stream.blocks.checks import check_fps
from emo_stream.errors import ConfigError, ImageInputError

FULL_SCALE = 2 / np.pi          # mean |x| of a full-scale sine: white
COUNTER_BITS = 16
COUNTER_COLS = 8
FLASH_FRACTION = 0.75           # rows [0, 0.75 size) flash; the counter below


@dataclass
class SyncAvatar:
    shape: tuple[int, ...]      # the portrait is not drawn: only its shape is kept (for logs)


@dataclass
class SyncState:
    frames: int = 0             # frames generated so far in this session (the counter's value)


def envelope(audio: np.ndarray, start: int, num_frames: int, spf: int) -> np.ndarray:
    """Mean absolute amplitude of each frame's own samples: audio[start + k spf : start + (k + 1) spf]."""
    x = np.asarray(audio, np.float32)[start:start + num_frames * spf]
    if len(x) < num_frames * spf:
        x = np.concatenate([x, np.zeros(num_frames * spf - len(x), np.float32)])
    return np.abs(x).reshape(num_frames, spf).mean(axis=1)


def brightness(level: np.ndarray | float) -> np.ndarray:
    """Envelope level -> flash grey level 0..255 (linear, clipped at a full-scale sine)."""
    return np.clip(np.round(np.asarray(level, np.float64) / FULL_SCALE * 255.0), 0, 255).astype(np.uint8)


def _layout(height: int, width: int) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Flash rows end, and (y0, y1, x0, x1) of each counter block, most significant bit first."""
    flash_end = int(round(height * FLASH_FRACTION))
    rows = COUNTER_BITS // COUNTER_COLS
    strip = height - flash_end
    blocks = []
    for b in range(COUNTER_BITS):
        r, c = divmod(b, COUNTER_COLS)
        y0 = flash_end + (strip * r) // rows
        y1 = flash_end + (strip * (r + 1)) // rows
        x0, x1 = (width * c) // COUNTER_COLS, (width * (c + 1)) // COUNTER_COLS
        blocks.append((y0, y1, x0, x1))
    return flash_end, blocks


def draw_pattern(out: np.ndarray, level: int, counter: int) -> None:
    """Paint one frame (H, W, 3) uint8 in place."""
    h, w = out.shape[:2]
    flash_end, blocks = _layout(h, w)
    out[:flash_end] = level
    value = counter % (1 << COUNTER_BITS)
    for b, (y0, y1, x0, x1) in enumerate(blocks):
        out[y0:y1, x0:x1] = 255 if (value >> (COUNTER_BITS - 1 - b)) & 1 else 0


def read_pattern(image: np.ndarray) -> tuple[float, int]:
    """(flash level 0..1, counter) of a received frame of any size, after JPEG/VP8/H.264 and scaling: the
    inner half of each area is averaged, so block edges blurred by a codec do not matter."""
    img = np.asarray(image, np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2)
    h, w = img.shape
    flash_end, blocks = _layout(h, w)
    flash = img[flash_end // 4: 3 * flash_end // 4, w // 4: 3 * w // 4].mean() / 255.0
    value = 0
    for y0, y1, x0, x1 in blocks:
        dy, dx = max(1, (y1 - y0) // 4), max(1, (x1 - x0) // 4)
        bit = img[y0 + dy:y1 - dy, x0 + dx:x1 - dx].mean() > 127.5
        value = (value << 1) | int(bit)
    return float(flash), value


def flash_level(samples: np.ndarray) -> float:
    """The flash level 0..1 a frame with these samples carries (before quantisation): for comparisons."""
    return float(min(1.0, np.abs(np.asarray(samples, np.float32)).mean() / FULL_SCALE)) if len(samples) else 0.0


class SyncTestBackend:
    """Test-pattern backend (see module doc). Options: clip_frames (offline segment length).

    Duck-typed rather than a BackendBase subclass, so bench/av_sync.py --repo can load this file into an older
    checkout (one without BackendBase) and measure it the same way."""

    name = "synctest"
    concurrent_generate = True       # stateless but for each session's counter
    stream_segment_frames = 1        # like the preview: the shortest latency the engine allows

    def __init__(self, size: int = 512, fps: int = 25, *, clip_frames: int = 12, **options: Any) -> None:
        ignored = set(options) - {"steps", "guidance", "decoder", "dtype", "weights_set"}
        if ignored:
            raise ConfigError(f"unknown option(s) for the synctest backend: {', '.join(sorted(ignored))}")
        if size < 32 or size > 2048 or size % 2:
            raise ConfigError(f"synctest size must be an even number of pixels between 32 and 2048: got {size}")
        self._spf = check_fps(fps)
        self.size = int(size)
        self.fps = int(fps)
        self.clip_frames = int(clip_frames)
        # each frame is drawn from its own samples only: no history, no look-ahead
        self.audio_context = AudioContext(left_samples=0, lookahead_frames=0)

    def prepare_avatar(self, image: np.ndarray) -> SyncAvatar:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ImageInputError("the portrait must be an RGB image")
        return SyncAvatar(shape=tuple(image.shape))

    def new_state(self, avatar: SyncAvatar, seed: int = 0) -> SyncState:
        return SyncState()

    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> np.ndarray:
        return envelope(audio, start, num_frames, self._spf)

    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        out = []
        for job in jobs:
            n = int(job.num_frames)
            state: SyncState = job.state
            levels = brightness(job.features) if job.features is not None and job.speech else np.zeros(n, np.uint8)
            frames = np.empty((n, self.size, self.size, 3), np.uint8)
            for i in range(n):
                draw_pattern(frames[i], int(levels[i]), state.frames + i)
            state.frames += n
            out.append(frames)
        return out


def create_backend(model: str | None = None, *, size: int = 512, fps: int = 25, device: str | None = None,
                   **options: Any) -> SyncTestBackend:
    """Registry factory: no model, CPU only."""
    if model:
        raise ConfigError(f"the synctest backend takes no model (got {model!r})")
    return SyncTestBackend(size=size, fps=fps, **options)
