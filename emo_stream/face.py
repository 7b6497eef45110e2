"""Face detection, 68-point landmarks, portrait cropping and face-region masks (dlib).

The detector and landmark model come from the `dlib-bin` and `face-recognition-models` packages,
so nothing is downloaded at run time. One `FaceAnalyzer` per process is enough; it is thread-safe
for reading but cheap to create per worker too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from emo_stream.errors import NoFaceError, WeightsError

log = logging.getLogger(__name__)

# dlib's 68-point layout
JAW = slice(0, 17)
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
NOSE = slice(27, 36)
MOUTH_OUTER = slice(48, 60)
MOUTH_INNER = slice(60, 68)

SMALL_PHOTO = 128  # px: below this a photo rarely holds a face dlib can find


def _models_dir() -> Path:
    # face_recognition_models imports pkg_resources on import; find its folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("face landmark model missing: pip install face-recognition-models")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@dataclass
class FaceInfo:
    """One detected face, in the pixel coordinates of the image it was found in."""

    box: np.ndarray        # (4,) float32: x0, y0, x1, y1
    landmarks: np.ndarray  # (68, 2) float32: x, y

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2], np.float32)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    def mouth_opening(self) -> float:
        """Inner-lip gap divided by the face width: 0 closed, ~0.1-0.2 wide open."""
        inner = self.landmarks[MOUTH_INNER]
        gap = np.mean(np.linalg.norm(inner[[5, 6, 7]] - inner[[3, 2, 1]], axis=1))  # 65-63, 66-62, 67-61
        face_w = np.linalg.norm(self.landmarks[16] - self.landmarks[0])
        return float(gap / max(face_w, 1e-6))

    def head_pose(self) -> np.ndarray:
        """Rough (yaw, pitch, roll) in radians from landmark geometry; enough for rotation *speed*."""
        lm = self.landmarks
        left_eye, right_eye = lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0)
        eye_vec = right_eye - left_eye
        roll = float(np.arctan2(eye_vec[1], eye_vec[0]))
        face_w = max(np.linalg.norm(lm[16] - lm[0]), 1e-6)
        nose = lm[30]
        mid_jaw = (lm[0] + lm[16]) / 2
        yaw = float(np.arcsin(np.clip(2 * (nose[0] - mid_jaw[0]) / face_w, -1, 1)))
        eyes_mid = (left_eye + right_eye) / 2
        chin = lm[8]
        ratio = np.linalg.norm(nose - eyes_mid) / max(np.linalg.norm(chin - eyes_mid), 1e-6)
        pitch = float(np.arcsin(np.clip((ratio - 0.42) * 2.5, -1, 1)))
        return np.array([yaw, pitch, roll], np.float32)


# Faces already found for a given image by another process (emo_stream.portrait_pool detects them where
# untrusted uploads are decoded, away from the serving process): detect() on the same pixels returns the
# known face instead of running dlib again (~0.5 s of CPU a photo, more for one without a face).
_KNOWN_FACES: OrderedDict[tuple, FaceInfo | None] = OrderedDict()   # None: it has no face
_UNKNOWN = object()
_KNOWN_LOCK = threading.Lock()
KNOWN_FACES_MAX = 8


def _image_key(image: np.ndarray, detect_size: int) -> tuple:
    digest = hashlib.sha1(memoryview(np.ascontiguousarray(image)).cast("B")).hexdigest()  # releases the GIL
    return (image.shape, str(image.dtype), detect_size, digest)


def remember_face(image: np.ndarray, face: FaceInfo | None, detect_size: int = 512) -> None:
    """Record what FaceAnalyzer(detect_size).detect(image) returns (computed elsewhere; None: no face)."""
    key = _image_key(image, detect_size)
    with _KNOWN_LOCK:
        _KNOWN_FACES[key] = face
        _KNOWN_FACES.move_to_end(key)
        while len(_KNOWN_FACES) > KNOWN_FACES_MAX:
            _KNOWN_FACES.popitem(last=False)


def _known_face(image: np.ndarray, detect_size: int) -> object:
    """The remembered detect() result for this image (a FaceInfo copy or None), else _UNKNOWN."""
    if not _KNOWN_FACES:
        return _UNKNOWN
    key = _image_key(image, detect_size)
    with _KNOWN_LOCK:
        face = _KNOWN_FACES.get(key, _UNKNOWN)
    if isinstance(face, FaceInfo):
        return FaceInfo(box=face.box.copy(), landmarks=face.landmarks.copy())
    return face


class FaceAnalyzer:
    """Finds the main face and its 68 landmarks. Detection runs on a downscaled copy for speed."""

    def __init__(self, detect_size: int = 512):
        import dlib

        predictor = _models_dir() / "shape_predictor_68_face_landmarks.dat"
        if not predictor.is_file():
            raise WeightsError(f"face landmark model missing: {predictor}")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor))
        self._dlib = dlib
        self._lock = threading.Lock()  # dlib objects are not documented as re-entrant
        self.detect_size = detect_size

    def detect(self, image: np.ndarray) -> FaceInfo | None:
        """The largest face in an RGB uint8 image, or None."""
        known = _known_face(image, self.detect_size)
        if known is not _UNKNOWN:
            return known
        h, w = image.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w))
        small = image
        if scale < 1.0:
            small = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        with self._lock:
            rects = self._detector(small, 1)
            if len(rects) == 0 and (scale < 1.0 or max(h, w) <= self.detect_size // 2):
                # small faces in big photos, and small photos (dlib finds no face under ~80 px at
                # one upsampling): upsample once more
                rects = self._detector(small, 2)
            if len(rects) == 0:
                return None
            rect = max(rects, key=lambda r: r.width() * r.height())
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32) / scale
            full = self._dlib.rectangle(*[int(round(v)) for v in box])
            shape = self._predictor(image, full)
        lm = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
        return FaceInfo(box=box, landmarks=lm)

    def landmarks(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """68 landmarks for a known face box (tracking: skip detection between frames)."""
        rect = self._dlib.rectangle(*[int(round(v)) for v in box])
        with self._lock:
            shape = self._predictor(image, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)

    def analyze(self, image: np.ndarray) -> FaceInfo:
        """Like detect(), but a photo without a face is a user error."""
        face = self.detect(image)
        if face is None:
            raise no_face_error(image)
        return face


def no_face_error(image: np.ndarray, need: str = "") -> NoFaceError:
    """The user-facing NoFaceError for `image`, saying when the photo itself is too small to be the cause."""
    h, w = image.shape[:2]
    if min(h, w) < SMALL_PHOTO:
        return NoFaceError(f"no face found in the {w}x{h} portrait: the photo is too small; use one where the "
                           f"face is at least ~80 pixels wide")
    return NoFaceError(f"no face found in the portrait: use a photo with one clearly visible, frontal face{need}")


@dataclass
class PortraitCrop:
    """A square crop of a portrait around its face, resized to the model size."""

    image: np.ndarray   # (size, size, 3) uint8
    face: FaceInfo      # in crop coordinates
    origin: np.ndarray  # (2,) top-left of the crop square in the source image
    scale: float        # crop pixels per source pixel


def crop_portrait(image: np.ndarray, face: FaceInfo, size: int, face_fraction: float = 0.45,
                  center_shift: float = 0.1) -> PortraitCrop:
    """Square crop so the face box takes `face_fraction` of the width, face a little above centre
    (as in EMO's training crops); padded by edge replication where the square leaves the photo."""
    h, w = image.shape[:2]
    side = min(face.width / face_fraction, max(h, w) * 1.0)
    side = max(side, face.width * 1.2)
    cx, cy = face.center
    cy = cy + center_shift * side * 0.5
    x0, y0 = cx - side / 2, cy - side / 2
    pad = int(np.ceil(max(0, -x0, -y0, x0 + side - w, y0 + side - h))) + 1
    src = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad > 1 else image
    off = pad if pad > 1 else 0
    box = (x0 + off, y0 + off, x0 + off + side, y0 + off + side)
    crop = Image.fromarray(src).resize((size, size), Image.LANCZOS, box=box)
    s = size / side
    origin = np.array([x0, y0], np.float32)
    cropped_face = FaceInfo(box=(face.box - np.tile(origin, 2)) * s, landmarks=(face.landmarks - origin) * s)
    return PortraitCrop(image=np.asarray(crop), face=cropped_face, origin=origin, scale=float(s))


def face_region_mask(boxes: np.ndarray | list, size: int, margin: float = 0.1) -> np.ndarray:
    """EMO's face locator input: the union of the face boxes of a clip as a (size, size) float32 mask."""
    mask = np.zeros((size, size), np.float32)
    for box in np.asarray(boxes, np.float32).reshape(-1, 4):
        x0, y0, x1, y1 = box
        mx, my = (x1 - x0) * margin, (y1 - y0) * margin
        xa, ya = int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my)))
        xb, yb = int(min(size, np.ceil(x1 + mx))), int(min(size, np.ceil(y1 + my)))
        mask[ya:yb, xa:xb] = 1.0
    return mask


def prepare_portrait(image: np.ndarray, size: int, analyzer: FaceAnalyzer | None = None) -> PortraitCrop:
    """Detect, crop and align a user's portrait to the model size. Raises NoFaceError."""
    analyzer = analyzer or FaceAnalyzer()
    face = analyzer.analyze(image)
    crop = crop_portrait(image, face, size)
    # landmarks are more precise when re-run at the working size
    crop.face.landmarks = analyzer.landmarks(crop.image, crop.face.box)
    return crop


def head_speed(poses: np.ndarray, smooth: int = 3) -> np.ndarray:
    """Per-frame head rotation speed in degrees per frame (the model's unit) from (T, 3) yaw/pitch/roll
    in radians: norm of frame differences, smoothed because landmark poses jitter."""
    poses = np.asarray(poses, np.float32)
    if len(poses) < 2:
        return np.zeros(len(poses), np.float32)
    if smooth > 1 and len(poses) >= 2 * smooth:
        # landmark poses jitter frame to frame; smooth the angles before differencing them
        k = 2 * smooth - 1
        padded = np.pad(poses, ((k // 2, k // 2), (0, 0)), mode="edge")
        poses = np.stack([np.convolve(padded[:, j], np.ones(k) / k, mode="valid") for j in range(3)], axis=1)
    d = np.degrees(np.linalg.norm(np.diff(poses, axis=0), axis=1))
    d = np.concatenate([d[:1], d])
    if smooth > 1 and len(d) >= smooth:
        d = np.convolve(np.pad(d, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"), np.ones(smooth) / smooth,
                        mode="valid")
    return d.astype(np.float32)
