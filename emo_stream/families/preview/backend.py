"""PreviewBackend: the weight-free CPU animator behind the standard backend protocol.

prepare_avatar: detect the face (dlib), frame a square portrait around it, landmarks at the working
size, build the FaceWarper (all per-avatar geometry precomputed). encode_audio: per-frame spectral
features (stateless). generate: features -> mouth shape (smoothed, state carried across segments) +
blinks/head motion (seeded) -> one warped frame each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from emo_stream.backend import AudioContext, BackendBase, SegmentJob, samples_per_frame
from emo_stream.blocks.checks import check_fps
from emo_stream.errors import ConfigError, ImageInputError
from emo_stream.face import FaceAnalyzer, FaceInfo, no_face_error
from emo_stream.families.preview.motion import MotionConfig, MotionModel, MotionState
from emo_stream.families.preview.mouth import MouthConfig, MouthFilter, MouthState, audio_features
from emo_stream.families.preview.warp import FaceWarper, FrameParams, WarpConfig

log = logging.getLogger(__name__)

# options other backends take (EMO sampling) that mean nothing here: accepted and ignored, so a
# server config written for EMO still starts the preview backend
_IGNORED_OPTIONS = {"steps", "guidance", "decoder", "dtype", "device", "model"}


@dataclass
class PreviewAvatar:
    image: np.ndarray      # (size, size, 3) framed portrait
    face: FaceInfo         # in `image` coordinates
    warper: FaceWarper


@dataclass
class PreviewState:
    mouth: MouthState = field(default_factory=MouthState)
    motion: MotionState | None = None
    frames: int = 0        # frames generated so far in this session


def frame_portrait(image: np.ndarray, face: FaceInfo, size: int, face_fraction: float = 0.40) -> tuple[np.ndarray, FaceInfo]:
    """Square crop around the face, resized to `size`: the face box takes about `face_fraction` of the
    width, a little above centre. The square stays inside the photo (no padded edges) unless the
    photo is too small for it."""
    h, w = image.shape[:2]
    side = max(face.width / face_fraction, face.width * 1.2)
    side = min(side, float(min(h, w)))
    cx, cy = face.center
    cy += 0.06 * side
    x0 = float(np.clip(cx - side / 2, 0, w - side))
    y0 = float(np.clip(cy - side / 2, 0, h - side))
    crop = Image.fromarray(image).resize((size, size), Image.LANCZOS, box=(x0, y0, x0 + side, y0 + side))
    s = size / side
    origin = np.array([x0, y0], np.float32)
    framed = FaceInfo(box=((face.box - np.tile(origin, 2)) * s).astype(np.float32),
                      landmarks=((face.landmarks - origin) * s).astype(np.float32))
    return np.asarray(crop).copy(), framed


class PreviewBackend(BackendBase):
    """CPU preview animator. Options: clip_frames (segment length the engine should use),
    face_fraction (framing), mouth / motion / warp (config dataclasses)."""

    name = "preview"

    def __init__(self, size: int = 512, fps: int = 25, *, clip_frames: int = 4, face_fraction: float = 0.40,
                 mouth: MouthConfig | None = None, motion: MotionConfig | None = None,
                 warp: WarpConfig | None = None, analyzer: FaceAnalyzer | None = None, **options: Any):
        unknown = set(options) - _IGNORED_OPTIONS
        if unknown:
            raise ConfigError(f"unknown option(s) for the preview backend: {', '.join(sorted(unknown))}")
        if options:
            log.info("preview backend ignores EMO option(s): %s", ", ".join(sorted(options)))
        if size < 64 or size > 2048 or size % 2:
            # even: H.264 (yuv420p) cannot encode odd widths
            raise ConfigError(f"preview size must be an even number of pixels between 64 and 2048: got {size}")
        check_fps(fps)
        if clip_frames < 1:
            raise ConfigError(f"clip_frames must be >= 1: got {clip_frames}")
        self.size = int(size)
        self.fps = int(fps)
        self.clip_frames = int(clip_frames)
        # live: one frame per step is cheapest in latency and costs no throughput here (~3.5 ms a frame)
        self.stream_segment_frames = 1
        self.face_fraction = face_fraction
        self._mouth = MouthFilter(mouth or MouthConfig(), fps=self.fps)
        # each frame's analysis window reaches a little before and after the frame's own samples
        # (at 25 fps: 32 samples before, 352 after: one frame of look-ahead)
        spf = samples_per_frame(self.fps)
        mc = self._mouth.config
        before = max(0, mc.window // 2 - mc.lead_samples - spf // 2)
        after = max(0, mc.window // 2 + mc.lead_samples - spf // 2)
        self.audio_context = AudioContext(left_samples=before, lookahead_frames=-(-after // spf))
        self._motion = MotionModel(fps=self.fps, config=motion or MotionConfig())
        self._warp_config = warp or WarpConfig()
        self._analyzer = analyzer

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer()
        return self._analyzer

    # ------------------------------------------------------------------ protocol
    def prepare_avatar(self, image: np.ndarray, face: FaceInfo | None = None) -> PreviewAvatar:
        """Frame and analyse a portrait. `face` (in `image` coordinates) skips detection when known."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageInputError(f"portrait must be an RGB uint8 image, got shape {image.shape} {image.dtype}")
        if min(image.shape[:2]) < 32:
            raise ImageInputError(f"portrait is too small: {image.shape[1]}x{image.shape[0]} pixels")
        if face is None:
            face = self.analyzer.detect(image)
            if face is None:
                raise no_face_error(image, " (the preview animator needs eyes, nose and mouth visible)")
        framed, framed_face = frame_portrait(image, face, self.size, self.face_fraction)
        # landmarks are more precise when re-run at the working size
        framed_face.landmarks = self.analyzer.landmarks(framed, framed_face.box)
        warper = FaceWarper(framed, framed_face.landmarks, self._warp_config)
        return PreviewAvatar(image=framed, face=framed_face, warper=warper)

    def new_state(self, avatar: PreviewAvatar, seed: int = 0) -> PreviewState:
        return PreviewState(motion=self._motion.new_state(seed))

    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> np.ndarray:
        return audio_features(audio, start, num_frames, fps=self.fps, config=self._mouth.config)

    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        return [self._generate_one(job) for job in jobs]

    # ------------------------------------------------------------------ internals
    def _generate_one(self, job: SegmentJob) -> np.ndarray:
        avatar: PreviewAvatar = job.avatar
        state: PreviewState = job.state
        n = int(job.num_frames)
        feats = job.features if job.speech else None
        mouth = self._mouth(feats, n, state.mouth)
        motion = self._motion(mouth[:, 0], feats is not None, state.motion)
        frames = np.empty((n, self.size, self.size, 3), np.uint8)
        for i in range(n):
            tx, ty, roll, nod, yaw = motion.head[i]
            p = FrameParams(jaw=float(mouth[i, 0]), width=float(mouth[i, 1]), blink=float(motion.blink[i]),
                            tx=float(tx), ty=float(ty), roll=float(roll), nod=float(nod), yaw=float(yaw))
            avatar.warper.render(p, out=frames[i])
        state.frames += n
        return frames


def create_backend(model: str | None = None, *, size: int = 512, fps: int = 25, device: str | None = None,
                   **options: Any) -> PreviewBackend:
    """Registry factory (emo_stream.registry): the preview needs no model and runs on the CPU."""
    if model:
        from emo_stream.errors import ConfigError

        raise ConfigError(f"the preview backend takes no model (got {model!r}): leave out the backend to run "
                          "the model with its own, or name one (emo, echomimic, hallo)")
    return PreviewBackend(size=size, fps=fps, **options)
