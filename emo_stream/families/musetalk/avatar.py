"""MuseTalk avatars: a portrait or a short idle video, framed to the output size and prepared once.

Per base frame (MuseTalk's realtime_inference "prepare_material"): the face box from 68 landmarks (dlib here,
DWPose in MuseTalk; the same rule: x from the landmarks' extent, the top as far above the nose (landmark 29)
as the chin is below it, the bottom at the chin plus v1.5's extra margin), the face crop resized to 256 x 256
(cv2 LANCZOS4), its latents for the UNet (masked + reference), and the blurred paste mask of the face-parsing
net. The frames play forward then backward (MuseTalk's cycle), so a loop never jumps.

Preparation runs once per avatar (the engine calls prepare_avatar in a worker thread and caches it by content)
and is also kept on disk, keyed by the frames' content, the model and the settings, so a restart or another
process does not repeat it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emo_stream.errors import ImageInputError

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$EMO_STREAM_CACHE/musetalk, else ~/.cache/emo-stream/musetalk."""
    root = os.environ.get("EMO_STREAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emo-stream")
    return Path(root) / "musetalk"


def face_box(landmarks: np.ndarray, height: int, extra_margin: int) -> tuple[int, int, int, int] | None:
    """MuseTalk's box from 68 landmarks (x, y), v1.5's margin added below: (x0, y0, x1, y1) ints, or None when
    the landmarks give no usable box (MuseTalk then falls back to the detector's box)."""
    lm = np.asarray(landmarks).astype(np.int32)
    mid = lm[29]
    bottom = int(lm[:, 1].max())
    top = max(0, int(mid[1] - (bottom - mid[1])))
    x0, x1 = int(lm[:, 0].min()), int(lm[:, 0].max())
    if bottom - top <= 0 or x1 - x0 <= 0 or x0 < 0:
        return None
    return x0, top, x1, min(bottom + int(extra_margin), int(height))


@dataclass
class MuseTalkAvatar:
    """A prepared avatar (shared read-only by every session using it)."""

    frames: torch.Tensor        # (N, S, S, 3) uint8 RGB base frames, on the model's device
    latents: torch.Tensor       # (N, 8, h, w) latents for the UNet (masked + reference), model dtype
    boxes: list                 # N face boxes (x0, y0, x1, y1)
    plans: list                 # N blending.BlendPlan
    key: str = ""               # content + model + settings digest (the disk cache's name)
    idle: dict = field(default_factory=dict)   # cycle index -> idle (silent) frame, filled on first use

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def cycle_index(self, position: int) -> int:
        """Frame shown at `position` of the forward-then-backward loop (length 2N, as MuseTalk's cycle)."""
        n = len(self)
        k = position % (2 * n)
        return k if k < n else 2 * n - 1 - k


def content_key(frames: np.ndarray, model_id: str, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(repr((CACHE_VERSION, frames.shape, model_id, sorted(settings.items()))).encode())
    h.update(memoryview(np.ascontiguousarray(frames)).cast("B"))
    return h.hexdigest()[:32]


def _tensor_file(avatar: MuseTalkAvatar) -> dict[str, torch.Tensor]:
    return {
        "frames": avatar.frames.cpu().contiguous(),
        "latents": avatar.latents.float().cpu().contiguous(),
        "boxes": torch.tensor(avatar.boxes, dtype=torch.int32),
        **{f"mask{i}": p.mask.cpu().contiguous() for i, p in enumerate(avatar.plans)},
    }


def store(cache_dir: Path | None, avatar: MuseTalkAvatar) -> None:
    if cache_dir is None:
        return
    from safetensors.torch import save_file

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        final = cache_dir / f"{avatar.key}.safetensors"
        tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
        save_file(_tensor_file(avatar), str(tmp))
        os.replace(tmp, final)
    except OSError as exc:   # a read-only or full disk costs the next start a preparation, nothing more
        log.warning("could not cache the prepared avatar in %s (%s)", cache_dir, exc.strerror or exc)


def restore(cache_dir: Path | None, key: str, device, dtype) -> MuseTalkAvatar | None:
    if cache_dir is None:
        return None
    path = cache_dir / f"{key}.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    from emo_stream.families.musetalk.blending import BlendPlan

    try:
        t = load_file(str(path))
        boxes = [tuple(int(v) for v in b) for b in t["boxes"].tolist()]
        plans = [BlendPlan(box=b, mask=t[f"mask{i}"].to(device)) for i, b in enumerate(boxes)]
    except Exception as exc:   # a truncated or foreign file: prepare again (and overwrite it)
        log.warning("ignoring unreadable avatar cache %s (%s)", path, type(exc).__name__)
        return None
    log.info("avatar %s restored from %s", key[:12], path)
    return MuseTalkAvatar(frames=t["frames"].to(device), latents=t["latents"].to(device, dtype), boxes=boxes,
                          plans=plans, key=key)


def prepare_frames(model, frames: np.ndarray, analyzer, *, generator: torch.Generator | None = None,
                   progress=None) -> MuseTalkAvatar:
    """(N, S, S, 3) uint8 RGB framed base frames -> MuseTalkAvatar (boxes, crops, latents, masks)."""
    import cv2

    from emo_stream.face import no_face_error
    from emo_stream.families.musetalk.blending import plan_from_material, prepare_blend

    cfg = model.config
    if model.parser is None:
        raise ImageInputError("this MuseTalk model was loaded without its face-parsing net: it cannot prepare avatars")
    device = model.device
    boxes, crops, plans = [], [], []
    last_box = None
    for i, frame in enumerate(frames):
        face = analyzer.detect(frame)
        box = face_box(face.landmarks, frame.shape[0], cfg.extra_margin) if face is not None else None
        if box is None and face is not None:   # MuseTalk's fallback: the detector's box
            x0, y0, x1, y1 = (int(round(v)) for v in face.box)
            box = (max(0, x0), max(0, y0), min(frame.shape[1], x1), min(frame.shape[0], y1))
        if box is None:
            if last_box is None:
                raise no_face_error(frame, " (MuseTalk repaints the mouth of a frontal face)")
            box = last_box   # a frame of the video where the face was not found: keep the previous box
        last_box = box
        x0, y0, x1, y1 = box
        bgr = np.ascontiguousarray(frame[:, :, ::-1])
        crops.append(cv2.resize(bgr[y0:y1, x0:x1], (cfg.crop_size, cfg.crop_size),
                                interpolation=cv2.INTER_LANCZOS4)[:, :, ::-1].copy())
        mask, crop_box = prepare_blend(bgr, box, model.parser, mode=cfg.parsing_mode,
                                       upper_boundary_ratio=cfg.upper_boundary_ratio, expand=cfg.blend_expand,
                                       blur=cfg.blur_realtime)
        plan = plan_from_material(box, mask, crop_box, device)
        if not bool((plan.mask > 0).any()):
            log.warning("face parsing found no skin in base frame %d: its mouth will not be repainted", i)
        plans.append(plan)
        boxes.append(box)
        if progress is not None:
            progress(i + 1, len(frames))
    latents = model.latents_for_unet(np.stack(crops), generator=generator)
    return MuseTalkAvatar(frames=torch.from_numpy(np.ascontiguousarray(frames)).to(device), latents=latents,
                          boxes=boxes, plans=plans)
