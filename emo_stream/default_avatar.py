"""The project's own default portrait, painted in code (no third-party photos ship with emo-stream).

A stylised head and shoulders built from soft-edged shapes: shaded skin, long hair with a side
fringe, almond eyes with irises, lids and lashes, tapered brows, a shaded nose and full lips,
softened with a little blur and grain so dlib's frontal face detector and its 68-point landmark
model treat it like a photo (tests check both). `default_portrait` is deterministic.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BASE = 512  # painted at this size, then resized

SKIN = np.array([228, 184, 156], np.float32)
HAIR = np.array([58, 38, 28], np.float32)
LIPS = np.array([186, 92, 92], np.float32)
IRIS = (82, 58, 40)
SHIRT = np.array([44, 86, 124], np.float32)


def _soft(sdf: np.ndarray, width: float = 1.2) -> np.ndarray:
    """Coverage 0..1 of a shape from a signed distance (negative inside), anti-aliased."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)[..., None]


def _ellipse_sdf(x, y, cx, cy, rx, ry):
    # approximate signed distance (pixels) of an ellipse: exact on the axes, close elsewhere
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return (r - 1.0) * min(rx, ry)


def _blend(img: np.ndarray, colour, cover: np.ndarray) -> np.ndarray:
    return img * (1.0 - cover) + np.asarray(colour, np.float32) * cover


def _paint_base(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = 256.0, 228.0
    # background: a soft studio gradient, lighter behind the head
    glow = np.exp(-(((x - cx) / 300) ** 2 + ((y - 200) / 260) ** 2))[..., None]
    img = np.array([150, 166, 182], np.float32) * (1 - glow) + np.array([205, 212, 220], np.float32) * glow

    # hair behind the head: a rounded crown falling to the shoulders with gentle waves
    wave = 6.0 * np.sin(y / 19.0) + 3.0 * np.sin(y / 7.3 + 1.0)
    half = 146.0 + wave - 18.0 * np.clip((y - 380) / 80, 0, 1)
    body = np.maximum(np.abs(x - cx) - half, np.maximum(cy - 40 - y, y - 430))
    crown = _ellipse_sdf(x, y, cx, cy - 38, 150, 160)
    hair_back = np.minimum(body, crown)
    img = _blend(img, HAIR * 0.82, _soft(hair_back, 2.5))

    # shoulders and a shirt with a round collar
    shirt = _ellipse_sdf(x, y, cx, 560, 250, 128)
    img = _blend(img, SHIRT, _soft(shirt, 2.0))
    # neck, shadowed under the jaw
    neck = np.maximum(np.abs(x - cx) - (42 + 0.35 * np.clip(y - 400, 0, None)), np.maximum(cy + 60 - y, y - 480))
    neck_col = SKIN[None, None] * (0.80 + 0.08 * np.clip((y - 360) / 90, 0, 1))[..., None]
    img = img * (1 - _soft(neck, 1.5)) + neck_col * _soft(neck, 1.5)
    # shadow the jaw casts on the neck
    img *= (1 - 0.22 * np.exp(-(((x - cx) / 50) ** 2 + ((y - (cy + 132)) / 16) ** 2)))[..., None]

    # face: an egg, narrower towards the chin, lit from the upper left
    t = np.clip((y - cy) / 132.0, 0, 1)
    rx = 101.0 * (1 - 0.2 * t ** 1.6)
    face_r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / 134.0) ** 2)
    face = _soft((face_r - 1.0) * 100.0, 1.5)
    light = 1.0 - 0.20 * np.clip(face_r, 0, 1) ** 2.2 - 0.07 * (x - cx) / 100.0 + 0.03 * (cy - y) / 130.0
    skin = SKIN[None, None] * light[..., None]
    blush = np.exp(-((np.abs(x - cx) - 60) ** 2 + (y - (cy + 40)) ** 2) / (2 * 20.0 ** 2))[..., None]
    skin = skin * (1 - 0.12 * blush) + np.array([224, 128, 118], np.float32) * 0.12 * blush
    # soft shading: eye sockets, along the nose, under the lower lip, around the chin
    for sx in (-44, 44):
        skin *= 1 - 0.07 * np.exp(-(((x - cx - sx) / 30) ** 2 + ((y - cy + 16) / 16) ** 2))[..., None]
    skin *= 1 - 0.08 * np.exp(-(((x - cx + 12) / 6) ** 2 + ((y - cy - 14) / 26) ** 2))[..., None]
    skin *= 1 - 0.08 * np.exp(-(((x - cx) / 22) ** 2 + ((y - cy - 104) / 6) ** 2))[..., None]
    img = img * (1 - face) + skin * face

    # ears peeking through the hair
    for side in (-1, 1):
        ear = _ellipse_sdf(x, y, cx + side * 101, cy + 8, 14, 28)
        img = _blend(img, SKIN * 0.84, _soft(ear, 1.5))

    # hair in front: a side-swept fringe above the forehead and locks framing the face
    part = cx - 36
    hairline = cy - 92 + 0.0042 * (x - part) ** 2 - 14 * np.exp(-((x - part - 40) / 40) ** 2)
    fringe = np.maximum(y - hairline, _ellipse_sdf(x, y, cx, cy - 40, 140, 152))
    img = _blend(img, HAIR, _soft(fringe, 2.0))
    for side in (-1, 1):
        lock_x = cx + side * (112 + 0.12 * np.clip(y - cy, 0, None))
        lock = np.maximum(np.abs(x - lock_x) - 14, np.maximum(cy - 60 - y, y - 372))
        img = _blend(img, HAIR * 0.95, _soft(lock, 2.5))
    # strands: fine streaks in the hair
    streak = (0.93 + 0.07 * np.sin(x / 3.1 + 4 * np.sin(y / 41.0)))[..., None]
    hair_mask = np.clip((np.abs(img - HAIR * 0.9).sum(-1, keepdims=True) < 40) * 1.0, 0, 1)
    img = img * (1 - hair_mask) + img * streak * hair_mask
    return img


def _paint_features(img: Image.Image) -> Image.Image:
    d = ImageDraw.Draw(img)
    cx, cy = 256, 228
    eye_y = cy - 16
    for side in (-1, 1):
        ex = cx + side * 44
        # tapered brow, thicker towards the nose
        inner, outer = ex - side * 26, ex + side * 30
        d.polygon([(inner, eye_y - 24), (ex - side * 6, eye_y - 35), (outer, eye_y - 30), (outer + side * 2, eye_y - 27),
                   (ex - side * 4, eye_y - 30), (inner, eye_y - 19)], fill=(66, 44, 32))
        # lid crease
        d.arc([ex - 25, eye_y - 20, ex + 25, eye_y + 4], 200, 340, fill=tuple(int(v * 0.82) for v in SKIN), width=2)
        # almond: white, iris, pupil, highlight
        white = [(ex - 24, eye_y + 1), (ex - 12, eye_y - 9), (ex + 2, eye_y - 11), (ex + 14, eye_y - 8),
                 (ex + 24, eye_y + 1), (ex + 12, eye_y + 7), (ex - 12, eye_y + 7)]
        if side < 0:
            white = [(2 * ex - px, py) for px, py in white]
        d.polygon(white, fill=(232, 226, 220))
        d.ellipse([ex - 10, eye_y - 10, ex + 10, eye_y + 8], fill=IRIS)
        d.ellipse([ex - 7, eye_y - 7, ex + 7, eye_y + 5], fill=(104, 74, 48))
        d.ellipse([ex - 4, eye_y - 4, ex + 4, eye_y + 3], fill=(16, 11, 9))
        d.ellipse([ex - 7, eye_y - 8, ex - 3, eye_y - 4], fill=(248, 248, 248))
        # upper lid line, lighter lower lid
        upper = white[:5]
        d.line(upper, fill=(34, 22, 18), width=4, joint="curve")
        d.line([white[4], white[5], white[6], white[0]], fill=(150, 104, 86), width=2, joint="curve")
    # nose: bridge line, tip, alar shadows and nostrils
    nose_y = cy + 40
    d.line([(cx - 9, eye_y + 4), (cx - 12, nose_y - 12)], fill=tuple(int(v * 0.84) for v in SKIN), width=4)
    d.ellipse([cx - 20, nose_y - 10, cx + 20, nose_y + 10], fill=tuple(int(v * 0.95) for v in SKIN))
    d.ellipse([cx - 8, nose_y - 8, cx + 6, nose_y], fill=tuple(min(255, int(v * 1.04)) for v in SKIN))
    d.arc([cx - 26, nose_y - 10, cx - 10, nose_y + 10], 100, 260, fill=tuple(int(v * 0.8) for v in SKIN), width=3)
    d.arc([cx + 10, nose_y - 10, cx + 26, nose_y + 10], 280, 80, fill=tuple(int(v * 0.8) for v in SKIN), width=3)
    d.ellipse([cx - 15, nose_y + 3, cx - 5, nose_y + 9], fill=(112, 62, 54))
    d.ellipse([cx + 5, nose_y + 3, cx + 15, nose_y + 9], fill=(112, 62, 54))
    # lips: cupid's bow on a darker upper lip, fuller lower lip with a highlight
    my = cy + 84
    upper = [(cx - 38, my), (cx - 24, my - 8), (cx - 8, my - 11), (cx, my - 7), (cx + 8, my - 11), (cx + 24, my - 8),
             (cx + 38, my), (cx + 20, my + 1), (cx, my + 2), (cx - 20, my + 1)]
    lower = [(cx - 38, my), (cx - 20, my + 1), (cx, my + 2), (cx + 20, my + 1), (cx + 38, my), (cx + 22, my + 13),
             (cx, my + 17), (cx - 22, my + 13)]
    d.polygon(lower, fill=tuple(int(v) for v in LIPS))
    d.polygon(upper, fill=tuple(int(v * 0.86) for v in LIPS))
    d.ellipse([cx - 12, my + 6, cx + 10, my + 11], fill=tuple(min(255, int(v * 1.15)) for v in LIPS))
    d.line([(cx - 38, my), (cx - 20, my + 1), (cx, my + 2), (cx + 20, my + 1), (cx + 38, my)],
           fill=(104, 44, 44), width=3, joint="curve")
    return img


def _paint(size: int = BASE) -> Image.Image:
    base = _paint_base(BASE, BASE)
    img = _paint_features(Image.fromarray(base.clip(0, 255).astype(np.uint8)))
    img = img.filter(ImageFilter.GaussianBlur(1.3))
    arr = np.asarray(img).astype(np.float32)
    # fine grain so flat areas do not look synthetic (fixed seed: the portrait is deterministic)
    arr += np.random.default_rng(7).normal(0, 1.8, arr.shape).astype(np.float32)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if size != BASE:
        img = img.resize((size, size), Image.LANCZOS)
    return img


def default_portrait(size: int = 512) -> np.ndarray:
    """The default avatar: an RGB uint8 (size, size, 3) portrait painted in code."""
    if size < 64:
        raise ValueError(f"default portrait size must be at least 64 pixels: got {size}")
    return np.asarray(_paint(size)).copy()
