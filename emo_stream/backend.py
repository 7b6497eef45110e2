"""The backend contract: what every animation backend implements, and what it may offer on top.

The streaming engine (emo_stream.streaming) and the offline generator (emo_stream.generate) drive a
backend; the EMO model (emo_stream.families.emo.backend) and the CPU preview animator (emo_stream.families.preview) are
backends, and tests use trivial ones. A backend knows nothing of sessions, clocks or networking.
Backends are found by name through the registry in emo_stream.registry.

Timeline convention (emo_stream.timeline): audio is 16 kHz mono float32; at `fps` video frames per
second, frame k covers audio samples [k * spf, (k + 1) * spf) with spf = SAMPLE_RATE // fps.

Required (the `Backend` protocol), in call order:
    avatar = backend.prepare_avatar(rgb_image)          # once per portrait; cached by the caller
    state  = backend.new_state(avatar, seed)            # once per session (or offline run)
    feats  = backend.encode_audio(window, start, n)     # per segment, may run in its own stage
    frames = backend.generate([SegmentJob(...), ...])   # per step of the engine; jobs of many
                                                        # sessions are batched into one call

Optional capabilities (declared with their defaults on `BackendBase`; read through `capabilities()`,
never with getattr elsewhere):
    stream_segment_frames   segment length suggested for live streaming (short for cheap backends:
                            latency; longer for diffusion: temporal context, batching)
    clip_frames             segment length for offline generation
    concurrent_generate     generate() calls for different sessions may run at the same time
    device                  the torch device it computes on (CUDA: the engine gives each stage a stream)
    denoise(jobs) / decode(jobs, latents)   (the `SplitGeneration` protocol) generation split in two,
                            so the engine overlaps decoding one segment with denoising the next
    video_avatars           prepare_avatar also takes a short idle video as (T, H, W, 3) frames (MuseTalk)
    encode_audio_batch(requests)   encode_audio for a list of (window, start, num_frames), results in order,
                            in one call (the engine's encoder stage hands it every segment queued at once:
                            one audio-encoder call for all sessions, e.g. MuseTalk's whisper)
    render_video(avatar, audio, seed, progress)   (the `WholeVideo` protocol) offline generation of the
                            whole audio at once (models sampled over the whole video, e.g. EchoMimic's
                            closed-loop context windows); `generate` then uses it instead of segments
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from emo_stream.errors import ImageInputError
from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

__all__ = ["SAMPLE_RATE", "samples_per_frame", "AudioContext", "SegmentJob", "Backend", "SplitGeneration",
           "WholeVideo", "BackendBase", "Capabilities", "capabilities", "DEFAULT_CLIP_FRAMES"]

DEFAULT_CLIP_FRAMES = 12   # EMO's f: the offline segment length of a backend that declares none


@dataclass(frozen=True)
class AudioContext:
    """How much audio around a segment a backend's audio encoder wants.

    encode_audio receives `left_samples` of history before the segment's first sample (fewer at the
    start of a stream) and `lookahead_frames` frames of audio after its last one (zero-padded at the
    end of speech). The engine cannot emit a frame before its look-ahead has arrived: this is part
    of the algorithmic latency.

    align_samples > 0: the window instead starts on a multiple of align_samples of the session's audio
    (counted from its first sample), the last one at or before `left_samples` ahead of the segment, so
    the backend can place it on its own grid (MuseTalk: whisper's 30 s segments, cut from the start of a
    file). The window then holds up to align_samples + left_samples of history.
    """

    left_samples: int = 0
    lookahead_frames: int = 0
    align_samples: int = 0

    def window_start(self, start: int) -> int:
        """Sample (of the audio, from its first) where the window of a segment starting at `start` begins."""
        lo = max(0, start - self.left_samples)
        return lo - lo % self.align_samples if self.align_samples > 0 else lo


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
    """What every backend implements."""

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


@runtime_checkable
class SplitGeneration(Protocol):
    """Optional: generate() in two stages, so the engine can overlap them across segments.
    decode(jobs, denoise(jobs)) must equal generate(jobs)."""

    def denoise(self, jobs: list[SegmentJob]) -> Any:
        """The expensive part (e.g. the diffusion loop); returns what decode needs (latents)."""

    def decode(self, jobs: list[SegmentJob], latents: Any) -> list[np.ndarray]:
        """Latents -> frames, as generate() returns them."""

    # Optional: select_latents(latents, indices) -> the latents of the jobs at those indices (in that order),
    # so a failed decode batch can be retried in halves. Not needed when denoise returns one entry per job
    # in a list (the engine splits that itself); without either, a failed decode fails its whole batch.


@runtime_checkable
class WholeVideo(Protocol):
    """Optional: offline generation of a whole audio in one sampling run (frames still come in chunks)."""

    def render_video(self, avatar: Any, audio: np.ndarray, seed: int = 0, progress: Any = None) -> Any:
        """Yield (frames (n, size, size, 3) uint8, the 16 kHz audio they cover) until the audio is covered;
        progress(stage, done, total) may be called along the way."""


class BackendBase:
    """Optional base class: every optional capability, declared with its default. A backend may
    subclass it (and override what it offers) or just set the same attributes itself."""

    name: str = "backend"
    stream_segment_frames: int | None = None   # None: the engine's default segment length
    clip_frames: int = DEFAULT_CLIP_FRAMES
    concurrent_generate: bool = False
    video_avatars: bool = False                # prepare_avatar takes (T, H, W, 3) video frames too
    device: Any = None                         # torch.device, or None (CPU / not torch)
    _face_analyzer: Any = None                 # emo_stream.face.FaceAnalyzer, made on first use

    def portrait_analyzer(self, image: np.ndarray) -> Any:
        """Check a user's portrait is an RGB array and return this backend's FaceAnalyzer (dlib's models load
        once, on the first portrait, not at start-up)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ImageInputError("the portrait must be an RGB image")
        if self._face_analyzer is None:
            from emo_stream.face import FaceAnalyzer
            self._face_analyzer = FaceAnalyzer()
        return self._face_analyzer


@dataclass(frozen=True)
class Capabilities:
    """A backend's optional capabilities, read once (see `capabilities`)."""

    name: str
    split: bool                       # offers SplitGeneration (denoise + decode)
    concurrent_generate: bool
    stream_segment_frames: int | None
    clip_frames: int
    device: Any
    whole_video: bool = False         # offers WholeVideo (render_video)
    video_avatars: bool = False       # prepare_avatar takes (T, H, W, 3) video frames too
    batch_audio: bool = False         # offers encode_audio_batch
    select_latents: Any = None        # SplitGeneration's select_latents(latents, indices), if offered


def capabilities(backend: Any) -> Capabilities:
    """The one place optional backend attributes are looked up (duck-typed backends work too)."""
    segment = getattr(backend, "stream_segment_frames", None)
    return Capabilities(
        name=str(getattr(backend, "name", None) or type(backend).__name__),
        split=callable(getattr(backend, "denoise", None)) and callable(getattr(backend, "decode", None)),
        concurrent_generate=bool(getattr(backend, "concurrent_generate", False)),
        stream_segment_frames=int(segment) if segment is not None else None,
        clip_frames=int(getattr(backend, "clip_frames", None) or DEFAULT_CLIP_FRAMES),
        device=getattr(backend, "device", None),
        whole_video=callable(getattr(backend, "render_video", None)),
        video_avatars=bool(getattr(backend, "video_avatars", False)),
        batch_audio=callable(getattr(backend, "encode_audio_batch", None)),
        select_latents=getattr(backend, "select_latents", None) if callable(getattr(backend, "select_latents", None))
        else None,
    )
