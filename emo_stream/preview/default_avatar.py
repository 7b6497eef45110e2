"""The project's own default portrait, painted in code (no third-party photos ship with emo-stream).

A stylised head and shoulders: shaded skin, hair, almond eyes with irises and lids, brows, a nose
with nostril shadows and lips, softened so dlib's frontal face detector and landmark model treat it
like a photo. `default_portrait` is deterministic. `default_face` gives the face geometry for the
painted portrait, for callers that want to skip detection.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BASE = 512  # the portrait is painted at this size, then resized

SKIN = (226, 182, 152)
HAIR = (62, 40, 28)
LIPS = (178, 88, 86)
IRIS = (88, 62, 40)
SHIRT = (46, 84, 120)


def _ellipse_mask(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _paint(size: int = BASE) -> Image.Image:
    s = BASE
    h = w = s
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: soft vertical gradient with a light falloff
    bg = np.empty((h, w, 3), np.float32)
    t = y / h
    for c, (top, bottom) in enumerate(((196, 150), (206, 164), (214, 178))):
        bg[..., c] = top * (1 - t) + bottom * t
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)

    cx, cy = 256, 236  # face centre
    # hair mass behind the head
    d.ellipse([cx - 150, cy - 190, cx + 150, cy + 120], fill=HAIR)
    d.rectangle([cx - 150, cy - 40, cx + 150, cy + 170], fill=HAIR)
    # shoulders and neck
    d.ellipse([cx - 250, 430, cx + 250, 700], fill=SHIRT)
    d.rectangle([cx - 48, cy + 100, cx + 48, 460], fill=tuple(int(v * 0.86) for v in SKIN))
    d.polygon([(cx - 48, 440), (cx, 480), (cx + 48, 440)], fill=tuple(int(v * 0.86) for v in SKIN))
    arr = np.asarray(img).astype(np.float32)

    # face: an egg shape with shading (darker towards the edges, lit from the upper left)
    rx, ry = 112.0, 148.0
    egg_r = ((x - cx) / (rx * (1 - 0.12 * np.clip((y - cy) / ry, 0, 1)))) ** 2 + ((y - cy) / ry) ** 2
    face = np.clip((1.0 - egg_r) * 18.0, 0, 1)[..., None]
    shade = 1.0 - 0.22 * np.clip(egg_r, 0, 1) ** 1.5 - 0.06 * (x - cx) / rx
    skin = np.array(SKIN, np.float32)[None, None] * shade[..., None]
    # warm cheeks
    cheek = np.exp(-(((x - cx) ** 2 - 0) * 0 + ((np.abs(x - cx) - 62) ** 2 + (y - (cy + 38)) ** 2) / (2 * 22.0 ** 2)))
    skin = skin * (1 - 0.10 * cheek[..., None]) + np.array([220, 120, 110], np.float32) * 0.10 * cheek[..., None]
    # ears
    for side in (-1, 1):
        ear = np.clip((1.0 - _ellipse_mask(h, w, cx + side * 112, cy + 6, 16, 32)) * 10, 0, 1)[..., None]
        arr = arr * (1 - ear) + np.array(SKIN, np.float32) * 0.85 * ear
    arr = arr * (1 - face) + skin * face
    # fringe of hair over the forehead
    fringe = np.clip((1.0 - _ellipse_mask(h, w, cx + 10, cy - 150, 128, 62)) * 12, 0, 1)[..., None]
    arr = arr * (1 - fringe) + np.array(HAIR, np.float32) * fringe

    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    eye_y = cy - 18
    for side in (-1, 1):
        ex = cx + side * 46
        # socket shadow, brow
        d.ellipse([ex - 34, eye_y - 18, ex + 34, eye_y + 16], fill=tuple(int(v * 0.85) for v in SKIN))
        brow = [(ex - side * 30, eye_y - 22), (ex - side * 8, eye_y - 34), (ex + side * 18, eye_y - 33),
                (ex + side * 34, eye_y - 24)]
        d.line(brow, fill=(70, 46, 32), width=8, joint="curve")
        # almond eye: white, iris, pupil, highlight, upper lid line
        white = [(ex - 26, eye_y), (ex - 12, eye_y - 11), (ex + 12, eye_y - 11), (ex + 26, eye_y),
                 (ex + 12, eye_y + 8), (ex - 12, eye_y + 8)]
        d.polygon(white, fill=(236, 232, 226))
        d.ellipse([ex - 10, eye_y - 11, ex + 10, eye_y + 9], fill=IRIS)
        d.ellipse([ex - 4, eye_y - 5, ex + 4, eye_y + 3], fill=(18, 12, 10))
        d.ellipse([ex - 7, eye_y - 8, ex - 3, eye_y - 4], fill=(250, 250, 250))
        d.line(white[:4], fill=(40, 26, 20), width=4, joint="curve")
        d.line([white[3], white[4], white[5], white[0]], fill=(150, 100, 80), width=2, joint="curve")
    # nose: side shadows, tip, nostrils
    nose_y = cy + 40
    d.line([(cx - 10, eye_y + 6), (cx - 14, nose_y - 6)], fill=tuple(int(v * 0.8) for v in SKIN), width=5)
    d.ellipse([cx - 22, nose_y - 8, cx + 22, nose_y + 12], fill=tuple(int(v * 0.9) for v in SKIN))
    d.ellipse([cx - 16, nose_y + 2, cx - 5, nose_y + 9], fill=(110, 62, 52))
    d.ellipse([cx + 5, nose_y + 2, cx + 16, nose_y + 9], fill=(110, 62, 52))
    # lips: upper and lower with a dark closing line
    mouth_y = cy + 82
    upper = [(cx - 36, mouth_y), (cx - 18, mouth_y - 10), (cx - 5, mouth_y - 7), (cx, mouth_y - 5),
             (cx + 5, mouth_y - 7), (cx + 18, mouth_y - 10), (cx + 36, mouth_y)]
    lower = [(cx + 36, mouth_y), (cx + 18, mouth_y + 13), (cx, mouth_y + 15), (cx - 18, mouth_y + 13),
             (cx - 36, mouth_y)]
    d.polygon(upper + lower, fill=LIPS)
    d.line([(cx - 36, mouth_y), (cx - 12, mouth_y + 1), (cx, mouth_y + 2), (cx + 12, mouth_y + 1), (cx + 36, mouth_y)],
           fill=(96, 40, 40), width=3, joint="curve")
    # chin shadow
    d.arc([cx - 40, mouth_y + 20, cx + 40, mouth_y + 60], 200, 340, fill=tuple(int(v * 0.88) for v in SKIN), width=3)

    img = img.filter(ImageFilter.GaussianBlur(1.6))
    arr = np.asarray(img).astype(np.float32)
    # fine grain so flat areas do not look synthetic
    rng = np.random.default_rng(7)
    arr += rng.normal(0, 2.0, arr.shape).astype(np.float32)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if size != BASE:
        img = img.resize((size, size), Image.LANCZOS)
    return img


def default_portrait(size: int = 512) -> np.ndarray:
    """The default avatar: an RGB uint8 (size, size, 3) portrait painted in code."""
    return np.asarray(_paint(size)).copy()
