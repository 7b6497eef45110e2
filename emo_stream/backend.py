"""The small protocol every animation backend implements.

The streaming engine (emo_stream.streaming) and the offline generator drive a backend; the EMO
model (emo_stream.emo_backend) and the CPU preview animator (emo_stream.preview) are backends, and
tests use trivial ones. A backend knows nothing of sessions, clocks or networking.

Timeline convention (shared by everything): audio is 16 kHz mono float32; at `fps` video frames
per second, frame k covers audio samples [k * spf, (k + 1) * spf) with spf = 16000 // fps
(640 at 25 fps).

Call order:
    avatar = backend.prepare_avatar(rgb_image)          # once per portrait; cached by the caller
    state  = backend.new_state(avatar, seed)            # once per session (or offline run)
    feats  = backend.encode_audio(window, start, n)     # per segment, may run in its own stage
    frames = backend.generate([SegmentJob(...), ...])   # per step of the engine; jobs of many
                                                        # sessions are batched into one call
Optional attribute `stream_segment_frames`: the segment length the backend suggests for live
streaming (short for cheap backends: latency; longer for diffusion: temporal context, batching).

Backends whose generation has a separate decode stage may also offer
    latents = backend.denoise(jobs); frames = backend.decode(jobs, latents)
so the engine can overlap decoding of one segment with denoising of the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16000


def samples_per_frame(fps: int) -> int:
    if fps <= 0 or SAMPLE_RATE % fps:
        raise ValueError(f"fps must be positive and divide {SAMPLE_RATE} (e.g. 25 or 20): got {fps}")
    return SAMPLE_RATE // fps


@dataclass(frozen=True)
class AudioContext:
    """How much audio around a segment a backend's audio encoder wants.

    encode_audio receives `left_samples` of history before the segment's first sample (fewer at the
    start of a stream) and `lookahead_frames` frames of audio after its last one (zero-padded at the
    end of speech). The engine cannot emit a frame before its look-ahead has arrived: this is part
    of the algorithmic latency.
    """

    left_samples: int = 0
    lookahead_frames: int = 0


@dataclass
class SegmentJob:
    """One segment of consecutive frames to generate for one session."""

    avatar: Any          # from prepare_avatar; shared read-only by all sessions using that portrait
    state: Any           # from new_state; the backend updates it (motion frames, rng, idle phase)
    features: Any        # from encode_audio for this segment, or None for an idle (silent) segment
    num_frames: int
    speech: bool = True  # False: silence; backends should render idle motion at a fraction of the cost


@runtime_checkable
class Backend(Protocol):
    name: str
    fps: int
    size: int
    audio_context: AudioContext

    def prepare_avatar(self, image: np.ndarray) -> Any:
        """RGB uint8 portrait of any size -> prepared avatar (face crop, cached reference features).
        Raises emo_stream.errors.NoFaceError / ImageInputError for unusable photos."""

    def new_state(self, avatar: Any, seed: int = 0) -> Any:
        """Fresh per-session state: no motion frames yet (the first segment starts from the reference)."""

    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> Any:
        """Features for `num_frames` frames whose first sample is audio[start]; audio[:start] is left
        context, and audio must extend lookahead_frames frames past the segment (zero-padded)."""

    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        """Frames for each job, (num_frames, size, size, 3) uint8 RGB, in order. Deterministic for a
        given state seed. Updates each job's state so the next segment continues from this one."""
