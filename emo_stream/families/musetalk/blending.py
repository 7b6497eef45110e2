"""Putting the repainted face crop back into the frame, as MuseTalk does, and the same on the GPU.

Once per avatar frame (`prepare_blend`, MuseTalk's get_image_prepare_material): the square around the face
box grown 1.5x is face-parsed (BiSeNet), the mask is cut to the face box, its upper part dropped (only the
lower `1 - upper_boundary_ratio` is repainted) and Gaussian-blurred. Per generated frame the crop is resized
to the face box and alpha-composited with that mask (PIL's paste: round((a m + b (255 - m)) / 255)).

    crop_box_for(face_box, 1.5)                          # the square that is parsed and blended
    offline_blend(frame, face, box, parser, ...)         # MuseTalk's get_image (PIL + cv2, BGR in/out)
    material = prepare_blend(frame, box, parser, ...)    # mask + crop box, once per avatar frame
    realtime_blend(frame, face, box, *material)          # get_image_blending (PIL, BGR)
    paste_batch(frames, crops, plan)                     # the same on torch tensors, on the model's device

All pixel arrays here follow MuseTalk's convention where they mirror its functions (BGR numpy); the tensor
path works on RGB, as the rest of emo-stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

BoxXYXY = tuple[int, int, int, int]


def crop_box_for(face_box: BoxXYXY, expand: float) -> tuple[list[int], int]:
    """The square around the face box's centre, side 2 int(max(w, h) // 2 x expand) (may leave the frame)."""
    x, y, x1, y1 = face_box
    xc, yc = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    return [xc - s, yc - s, xc + s, yc + s], s


def blur_kernel(fraction: float, side: int) -> int:
    """Odd Gaussian kernel size: int(fraction x side // 2 x 2) + 1."""
    return int(fraction * side // 2 * 2) + 1


def _mask_in(body, face_box, crop_box, parser, mode, upper_boundary_ratio, blur, cv2, Image):
    x, y, x1, y1 = face_box
    xs, ys = crop_box[:2]
    large = body.crop(tuple(crop_box))
    parsed = Image.fromarray(parser(large, mode=mode)).resize(large.size)   # PIL's default filter, as MuseTalk
    inner = (x - xs, y - ys, x1 - xs, y1 - ys)
    cut = Image.new("L", large.size, 0)
    cut.paste(parsed.crop(inner), inner)
    w, h = cut.size
    top = int(h * upper_boundary_ratio)
    lowered = Image.new("L", large.size, 0)
    lowered.paste(cut.crop((0, top, w, h)), (0, top))
    k = blur_kernel(blur, large.size[0])
    return cv2.GaussianBlur(np.array(lowered), (k, k), 0), large


def offline_blend(frame_bgr: np.ndarray, face_bgr: np.ndarray, face_box: BoxXYXY, parser, mode: str = "jaw",
                  upper_boundary_ratio: float = 0.5, expand: float = 1.5, blur: float = 0.05) -> np.ndarray:
    """MuseTalk's offline paste (get_image): the frame parsed per call, mask blurred by `blur` of the square."""
    import cv2
    from PIL import Image

    body = Image.fromarray(frame_bgr[:, :, ::-1])
    crop_box, _ = crop_box_for(face_box, expand)
    mask, large = _mask_in(body, face_box, crop_box, parser, mode, upper_boundary_ratio, blur, cv2, Image)
    return _paste(body, large, face_bgr, face_box, crop_box, mask)


def prepare_blend(frame_bgr: np.ndarray, face_box: BoxXYXY, parser, mode: str = "jaw",
                  upper_boundary_ratio: float = 0.5, expand: float = 1.5, blur: float = 0.1):
    """MuseTalk's get_image_prepare_material: (mask uint8 (side, side), crop box [x0, y0, x1, y1])."""
    import cv2
    from PIL import Image

    body = Image.fromarray(frame_bgr[:, :, ::-1])
    crop_box, _ = crop_box_for(face_box, expand)
    mask, _ = _mask_in(body, face_box, crop_box, parser, mode, upper_boundary_ratio, blur, cv2, Image)
    return mask, crop_box


def realtime_blend(frame_bgr: np.ndarray, face_bgr: np.ndarray, face_box: BoxXYXY, mask: np.ndarray,
                   crop_box) -> np.ndarray:
    """MuseTalk's get_image_blending with prepared material (PIL; the reference for paste_batch)."""
    from PIL import Image

    body = Image.fromarray(frame_bgr[:, :, ::-1])
    return _paste(body, body.crop(tuple(crop_box)), face_bgr, face_box, crop_box, mask)


def _paste(body, large, face_bgr, face_box, crop_box, mask) -> np.ndarray:
    from PIL import Image

    x, y, x1, y1 = face_box
    xs, ys = crop_box[:2]
    large.paste(Image.fromarray(face_bgr[:, :, ::-1]), (x - xs, y - ys, x1 - xs, y1 - ys))
    body.paste(large, (xs, ys), Image.fromarray(mask).convert("L"))
    return np.array(body)[:, :, ::-1]


# ---- the live path: tensors on the model's device -------------------------------------------------------------
@dataclass
class BlendPlan:
    """Per avatar frame, what the GPU paste needs (built once per avatar): the face box and the part of the
    blurred mask over it. Outside the face box MuseTalk's composite equals the frame (the square is the frame
    there), so only the box is touched."""

    box: BoxXYXY            # x0, y0, x1, y1 in the frame (inside it)
    mask: torch.Tensor      # (y1 - y0, x1 - x0) uint8: the blurred mask's values over the box


def plan_from_material(face_box: BoxXYXY, mask: np.ndarray, crop_box, device=None) -> BlendPlan:
    x, y, x1, y1 = face_box
    xs, ys = crop_box[:2]
    part = mask[y - ys:y1 - ys, x - xs:x1 - xs]
    return BlendPlan(box=(x, y, x1, y1), mask=torch.from_numpy(np.ascontiguousarray(part)).to(device))


def resize_linear(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W, C) uint8 -> (height, width, C) uint8 as cv2.resize(INTER_LINEAR) computes it: pixel-centre
    sampling with 11-bit fixed-point weights, horizontal then vertical, and cv2's rounding."""
    src_h, src_w = img.shape[:2]
    dev = img.device
    xi, xw = _linear_taps(int(src_w), int(width), dev, True)
    yi, yw = _linear_taps(int(src_h), int(height), dev, False)
    x = img.to(torch.int32)
    # horizontal pass: int sums of 11-bit weights (cv2's HResizeLinear for uint8)
    row = x[:, xi[:, 0]] * xw[:, 0, None] + x[:, xi[:, 1]] * xw[:, 1, None]
    # vertical pass: cv2's VResizeLinear<uchar> fixed point: ((b0 (s0 >> 4)) >> 16) + ((b1 (s1 >> 4)) >> 16) + 2 >> 2
    r0, r1 = row[yi[:, 0]] >> 4, row[yi[:, 1]] >> 4
    out = ((yw[:, 0, None, None] * r0) >> 16) + ((yw[:, 1, None, None] * r1) >> 16)
    return ((out + 2) >> 2).clamp(0, 255).to(torch.uint8)


@lru_cache(maxsize=256)   # per (size, size, device): the live path reuses a few box sizes
def _linear_taps(src: int, dst: int, device, clamp_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, 2) source indices and (dst, 2) int32 11-bit weights, as cv2 computes them: across a row, taps
    outside the image become weight (1, 0) on the edge pixel; down the columns the weights stay and the
    rows are clipped to the image. Computed on `device` (IEEE float64/float32 ops, as cv2's, so exact there
    too): no host data is copied in, so a new box size costs the live loop no blocking copy."""
    scale = 1.0 / (dst / src)
    d = torch.arange(dst, dtype=torch.float64, device=device)
    f = ((d + 0.5) * scale - 0.5).to(torch.float32)
    s = torch.floor(f).to(torch.int64)
    f = f - s.to(torch.float32)
    if clamp_weights:
        low = s < 0
        f, s = torch.where(low, 0.0, f), torch.where(low, 0, s)
        high = s >= src - 1
        f, s = torch.where(high, 0.0, f), torch.where(high, src - 1, s)
    # saturate_cast<short> rounds half to even (torch.round too); each weight is rounded on its own, as cv2 does
    one = torch.ones((), dtype=torch.float32, device=device)
    w = torch.stack([torch.round((one - f) * 2048.0), torch.round(f * 2048.0)], 1).to(torch.int32)
    idx = torch.stack([s, s + 1], 1).clamp(0, src - 1)
    return idx, w


def composite(base: torch.Tensor, top: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PIL's paste through an L mask, exactly: round((top m + base (255 - m)) / 255) on uint8 tensors."""
    m = mask.to(torch.int32)[..., None]
    v = top.to(torch.int32) * m + base.to(torch.int32) * (255 - m) + 128
    return ((v + (v >> 8)) >> 8).to(torch.uint8)


def paste_one(frame: torch.Tensor, crop: torch.Tensor, plan: BlendPlan) -> torch.Tensor:
    """(H, W, 3) uint8 frame + (s, s, 3) uint8 repainted crop -> the blended frame (new tensor), on their device."""
    x, y, x1, y1 = plan.box
    face = resize_linear(crop, y1 - y, x1 - x)
    out = frame.clone()
    out[y:y1, x:x1] = composite(frame[y:y1, x:x1], face, plan.mask)
    return out


def paste_batch(frames: list[torch.Tensor], crops: torch.Tensor, plans: list[BlendPlan]) -> list[torch.Tensor]:
    """Each crop into its frame (frames may differ in size; everything stays on the device, no host sync)."""
    return [paste_one(f, c, p) for f, c, p in zip(frames, crops, plans)]
