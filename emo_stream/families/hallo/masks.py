"""Hallo's region masks: a face box and a lip box -> the face-locator input and the full / face / lip masks
its audio blocks use at every UNet level (golden README, "Masks and face ID").

Boxes come from landmarks: Hallo takes min/max over mediapipe's face-silhouette and lip landmark ids; with
our dlib 68-point detector the jaw line + brows give the face box and points 48-67 the lip box
(`boxes_from_dlib68`). The rest is Hallo's arithmetic, including its integer/float rounding:

    box -> expand (face x1.2, lip x2.0), shifted back inside the image -> binary 255 mask (H, W)
    -> cv2.resize to 64x64 (bilinear) -> GaussianBlur (face 51, lip 31; sigma 0) -> min-max to 0..255
    background = uint8((1 - face_blur / 255) * 255); face = saturating face_blur - lip_blur; lip = lip_blur
    level k = PIL bilinear resize to (H / 8 / 2^k) of those 64x64 maps, / 255, flattened row-major
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

# mediapipe FaceMesh (478 points) ids Hallo uses
SILHOUETTE_IDS = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                  152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
LIP_IDS = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375]
BLUR_SIZE = 64
FACE_KERNEL = 51
LIP_KERNEL = 31


def box_of(points: np.ndarray) -> tuple[float, float, float, float]:
    """(min_x, min_y, max_x, max_y) rounded, as Hallo does before expanding."""
    pts = np.asarray(points, dtype=np.float64)
    lo, hi = np.round(pts.min(0)), np.round(pts.max(0))
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def boxes_from_mediapipe(landmarks: np.ndarray) -> tuple[tuple, tuple]:
    """478 mediapipe landmarks (pixels) -> (face box, lip box)."""
    lm = np.asarray(landmarks)
    return box_of(lm[SILHOUETTE_IDS]), box_of(lm[LIP_IDS])


def boxes_from_dlib68(points: np.ndarray) -> tuple[tuple, tuple]:
    """dlib's 68 points (pixels) -> (face box over jaw + brows, lip box over the mouth points 48-67).

    mediapipe's silhouette reaches the hairline; dlib's top is the brows, so the face box is raised by a
    fifth of its height to cover the forehead (an approximation: Hallo itself used mediapipe)."""
    pts = np.asarray(points, dtype=np.float64)
    x0, y0, x1, y1 = box_of(pts[:27])
    y0 = float(np.round(y0 - 0.2 * (y1 - y0)))
    return (x0, y0, x1, y1), box_of(pts[48:68])


def expand_box(box: tuple, width: int, height: int, ratio: float) -> tuple[int, int, int, int]:
    """Hallo's expand_region: grow around the (floored) centre, shift back inside -> ints (x0, y0, x1, y1)."""
    min_x, min_y, max_x, max_y = box
    mid_x, mid_y = (max_x + min_x) // 2, (max_y + min_y) // 2
    side_x, side_y = (max_x - min_x) * ratio, (max_y - min_y) * ratio
    min_x, max_x = mid_x - side_x // 2, mid_x + side_x // 2
    min_y, max_y = mid_y - side_y // 2, mid_y + side_y // 2
    min_x, max_x = _shift_inside(min_x, max_x, width)
    min_y, max_y = _shift_inside(min_y, max_y, height)
    return round(min_x), round(min_y), round(max_x), round(max_y)


def _shift_inside(lo, hi, limit):
    """One axis of expand_region's shift: past 0, moved right; then past `limit`, moved left (in that order:
    a span longer than the image keeps its end at the limit)."""
    if lo < 0:
        hi -= lo
        lo = 0
    if hi > limit:
        lo -= hi - limit
        hi = limit
    return lo, hi


def box_mask(box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[round(y0):round(y1), round(x0):round(x1)] = 255
    return mask


def blur(mask: np.ndarray, kernel: int) -> np.ndarray:
    small = cv2.resize(mask, (BLUR_SIZE, BLUR_SIZE))
    blurred = cv2.GaussianBlur(small, (kernel, kernel), 0)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


@dataclass
class RegionMasks:
    face_mask: np.ndarray     # (H, W) uint8 {0, 255}: the face-locator input
    background: np.ndarray    # (64, 64) uint8
    face: np.ndarray          # (64, 64) uint8
    lip: np.ndarray           # (64, 64) uint8

    def face_region(self) -> torch.Tensor:
        """(3, H, W) float in {0, 1}: the face mask as an RGB image (the face locator's input)."""
        m = torch.from_numpy(self.face_mask.astype(np.float32) / 255.0)
        return m[None].repeat(3, 1, 1)

    def levels(self, image_hw: tuple[int, int], n_levels: int = 4) -> list[tuple[torch.Tensor, ...]]:
        """[(full, face, lip)] per UNet level k, each (1, h_k * w_k) float at image / (8 * 2^k)."""
        h, w = image_hw
        out = []
        for k in range(n_levels):
            size = (w // (8 * 2 ** k), h // (8 * 2 ** k))
            out.append(tuple(_resize01(m, size) for m in (self.background, self.face, self.lip)))
        return out


def _resize01(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    img = Image.fromarray(mask).resize(size, Image.BILINEAR)   # what torchvision's Resize does on PIL
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).reshape(1, -1)


def region_masks(face_box: tuple, lip_box: tuple, width: int, height: int,
                 face_expand_ratio: float = 1.2, lip_expand_ratio: float = 2.0) -> RegionMasks:
    face = box_mask(expand_box(face_box, width, height, face_expand_ratio), width, height)
    lip = box_mask(expand_box(lip_box, width, height, lip_expand_ratio), width, height)
    face_blur, lip_blur = blur(face, FACE_KERNEL), blur(lip, LIP_KERNEL)
    background = ((1.0 - face_blur / 255.0) * 255).astype(np.uint8)
    return RegionMasks(face, background, cv2.subtract(face_blur, lip_blur), lip_blur)
