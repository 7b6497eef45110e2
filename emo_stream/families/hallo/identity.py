"""Face identity for Hallo: the 512-d ArcFace embedding of insightface's recognition ONNX model, shipped in the
Hallo download (pretrained_models/face_analysis/models/glintr100.onnx), run with onnxruntime (optional extra:
`pip install onnxruntime`) on our aligned 112x112 crop.

What insightface does and we reproduce: 5 points (eye centres, nose tip, mouth corners) -> least-squares
similarity onto ArcFace's template -> warpAffine to 112x112 -> RGB, (x - 127.5) / 127.5 -> NCHW -> the
model's output, NOT normalised (Hallo feeds `face.embedding` as is to its image projection). Our 5 points
come from dlib's 68 (insightface uses its own SCRFD detector: close, not identical).

Licence: insightface's pretrained models are for non-commercial research use only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from emo_stream.errors import WeightsError

log = logging.getLogger(__name__)

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
RECOGNITION_FILES = ("glintr100.onnx", "w600k_r50.onnx")
MISSING = ("face identity: onnxruntime is not installed (pip install onnxruntime); "
           "Hallo runs with a zero face embedding, which weakens identity")


def five_points_from_dlib68(landmarks: np.ndarray) -> np.ndarray:
    """dlib 68 points -> insightface's 5 (left eye, right eye, nose tip, left / right mouth corner)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, as skimage's SimilarityTransform.estimate) -> 2x3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / s.var(0).sum()
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def align(image_rgb: np.ndarray, five_points: np.ndarray, size: int = 112) -> np.ndarray:
    """RGB image + 5 points -> aligned (size, size, 3) RGB crop."""
    m = similarity(five_points, ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(image_rgb, m, (size, size), borderValue=0.0)


def find_recognition_model(folder: str | Path) -> Path | None:
    folder = Path(folder)
    for name in RECOGNITION_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


class FaceEmbedder:
    """onnxruntime session of an ArcFace recognition model."""

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise WeightsError(MISSING) from None
        path = Path(onnx_path)
        if not path.is_file():
            raise WeightsError(f"{path}: face recognition model not found")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise WeightsError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.size = int(shape[2]) if isinstance(shape[2], int) else 112
        self.mean, self.std = _input_norm(path)

    def embed_aligned(self, crop_rgb: np.ndarray) -> np.ndarray:
        """(size, size, 3) uint8 RGB aligned crop -> (512,) float32 embedding (unnormalised)."""
        if crop_rgb.shape[:2] != (self.size, self.size):
            crop_rgb = cv2.resize(crop_rgb, (self.size, self.size))
        x = (crop_rgb.astype(np.float32) - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32).reshape(-1)

    def embed(self, image_rgb: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
        return self.embed_aligned(align(image_rgb, five_points_from_dlib68(landmarks68), self.size))


def _input_norm(path: Path) -> tuple[float, float]:
    """insightface's rule: a model whose graph starts with Sub and Mul normalises itself (mean 0, std 1);
    otherwise (x - 127.5) / 127.5. Needs the `onnx` package to look; without it, 127.5 (glintr100, w600k)."""
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [n.name for n in graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if sub and mul else (127.5, 127.5)


def face_embedding(image_rgb: np.ndarray, landmarks68: np.ndarray, face_models: str | Path | None) -> np.ndarray:
    """The 512-d embedding Hallo conditions on, or zeros with one logged line when it cannot be computed
    (no onnxruntime, no recognition model in the download)."""
    model = find_recognition_model(face_models) if face_models else None
    if model is None:
        where = face_models or "the model folder (no face_analysis/models)"
        log.warning("face identity: no insightface recognition model (%s) in %s; using a zero embedding",
                    " / ".join(RECOGNITION_FILES), where)
        return np.zeros(512, np.float32)
    try:
        embedder = FaceEmbedder(model)
    except WeightsError as exc:
        log.warning("%s", exc)
        return np.zeros(512, np.float32)
    return embedder.embed(image_rgb, landmarks68)
