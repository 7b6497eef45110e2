"""Loaders for prepared (and synthetic) training sets, and a resumable, deterministic sampler.

Every sample is addressed by (clip index, sample seed): the seed decides the frames picked inside the
clip, so the batch of any step is a pure function of (config seed, step, process rank). Resuming at
step k therefore replays exactly the batches an uninterrupted run would have seen, on any number of
DataLoader workers, without saving iterator state.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from emo_stream.errors import ConfigError
from emo_stream.training.dataset_layout import (SAMPLES_PER_FRAME, ClipRecord, clip_dir, read_info, read_manifest,
                                                read_video, read_wav)

log = logging.getLogger(__name__)


@dataclass
class LoadedClip:
    frames: np.ndarray      # (T, S, S, 3) uint8 at the dataset size
    audio: np.ndarray       # (T * 640,) float32
    boxes: np.ndarray       # (T, 4)
    speed: np.ndarray       # (T,) degrees per frame
    features: np.ndarray | None


class ClipStore:
    """Reads clips of one or more prepared folders, keeping the most recent `cache` decoded in memory."""

    def __init__(self, roots: list[str | Path], cache: int = 32):
        self.records: list[tuple[Path, ClipRecord]] = []
        for root in roots:
            root = Path(root)
            if not root.is_dir():
                raise ConfigError(f"dataset folder not found: {root}")
            read_info(root)
            recs = read_manifest(root)
            if not recs:
                raise ConfigError(f"dataset {root} has no clips (empty manifest.jsonl): prepare it first")
            self.records += [(root, r) for r in recs]
        self.cache = cache
        self._loaded: OrderedDict[int, LoadedClip] = OrderedDict()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> LoadedClip:
        if i in self._loaded:
            self._loaded.move_to_end(i)
            return self._loaded[i]
        root, rec = self.records[i]
        d = clip_dir(root, rec.id)
        try:
            frames = read_video(d / "video.mp4")
            audio = read_wav(d / "audio.wav")
            meta = np.load(d / "meta.npz")
            feats = np.load(d / "audio_features.npy") if rec.audio_features else None
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"clip {rec.id} in {root} is unreadable ({exc.__class__.__name__}: {exc}); "
                              f"delete its manifest line and re-run prepare") from None
        n = min(len(frames), len(audio) // SAMPLES_PER_FRAME, len(meta["boxes"]))
        clip = LoadedClip(frames=frames[:n], audio=audio[: n * SAMPLES_PER_FRAME], boxes=meta["boxes"][:n],
                          speed=meta["speed"][:n].astype(np.float32), features=None if feats is None else feats[:n])
        self._loaded[i] = clip
        while len(self._loaded) > self.cache:
            self._loaded.popitem(last=False)
        return clip


def _to_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (..., S, S, 3) -> float (..., 3, size, size) in [-1, 1], resized if the dataset size differs."""
    if frames.shape[-2] != size:
        from PIL import Image

        flat = frames.reshape(-1, *frames.shape[-3:])
        flat = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in flat])
        frames = flat.reshape(*frames.shape[:-3], size, size, 3)
    t = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


def _mask(boxes: np.ndarray, src_size: int, size: int) -> torch.Tensor:
    from emo_stream.face import face_region_mask

    return torch.from_numpy(face_region_mask(np.asarray(boxes) * (size / src_size), size))[None]


class EmoDataset(torch.utils.data.Dataset):
    """Samples for stage 1 (`mode="image"`: reference + target frame of one clip) or stages 2/3
    (`mode="video"`: n motion frames + f target frames, the audio around them, head speed).

    Index with a (clip index, seed) pair (see StepSampler). Images are float in [-1, 1], (3, H, W).
    """

    def __init__(self, roots: list[str | Path], size: int, mode: str = "image", clip_frames: int = 12,
                 motion_frames: int = 4, audio_left_frames: int = 0, audio_right_frames: int = 2,
                 motion_drop: float = 0.1, cache: int = 32):
        if mode not in ("image", "video"):
            raise ValueError(f"mode must be image or video, got {mode!r}")
        self.store = ClipStore(roots, cache)
        self.size, self.mode = size, mode
        self.f, self.n = clip_frames, motion_frames
        self.left, self.right = audio_left_frames, audio_right_frames
        self.motion_drop = motion_drop
        # cached audio features are used only when every clip has them (a batch must be uniform)
        self.use_features = all(r.audio_features for _, r in self.store.records)
        need = 2 if mode == "image" else self.f + 1
        self.usable = [i for i, (_, r) in enumerate(self.store.records) if r.frames >= need]
        if not self.usable:
            raise ConfigError(f"no clip has the {need} frames {mode} training needs (clip_frames={self.f})")
        if len(self.usable) < len(self.store):
            log.warning("%d clips shorter than %d frames are not used", len(self.store) - len(self.usable), need)

    def __len__(self) -> int:
        return len(self.usable)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        rng = np.random.default_rng(seed)
        clip = self.store.load(self.usable[index])
        T, src = len(clip.frames), clip.frames.shape[1]
        if self.mode == "image":
            ref, tgt = rng.choice(T, size=2, replace=False)
            return {"reference": _to_tensor(clip.frames[ref], self.size),
                    "target": _to_tensor(clip.frames[tgt], self.size),
                    "mask": _mask(clip.boxes[tgt:tgt + 1], src, self.size)}
        f, n = self.f, self.n
        lo = n if T >= n + f else 0
        s = int(rng.integers(lo, T - f + 1))
        has_motion = s >= n and rng.random() >= self.motion_drop
        ref = int(rng.integers(0, T))
        reference = _to_tensor(clip.frames[ref], self.size)
        motion = (_to_tensor(clip.frames[s - n:s], self.size) if has_motion
                  else reference[None].expand(n, -1, -1, -1).clone())
        # audio of frames [s - left, s + f + right), zero outside the clip (as at the ends of a stream)
        a0, a1 = (s - self.left) * SAMPLES_PER_FRAME, (s + f + self.right) * SAMPLES_PER_FRAME
        audio = np.zeros(a1 - a0, np.float32)
        src_lo, src_hi = max(a0, 0), min(a1, len(clip.audio))
        audio[src_lo - a0:src_hi - a0] = clip.audio[src_lo:src_hi]
        item = {"reference": reference, "motion": motion, "frames": _to_tensor(clip.frames[s:s + f], self.size),
                "has_motion": torch.tensor(has_motion), "mask": _mask(clip.boxes[s:s + f], src, self.size),
                "audio": torch.from_numpy(audio), "speed": torch.from_numpy(clip.speed[s:s + f].copy())}
        if self.use_features and clip.features is not None:
            item["audio_features"] = torch.from_numpy(np.ascontiguousarray(clip.features[s:s + f]))
        return item


class StepSampler(torch.utils.data.Sampler):
    """Batches of (index, seed) for steps start, start+1, ...: epoch-wise shuffles of the dataset, each
    process taking its own slice of the global batch. Deterministic in (seed, step, rank)."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0,
                 world: int = 1, stop: int | None = None):
        self.n, self.batch, self.seed = num_items, batch_size, seed
        self.start, self.rank, self.world, self.stop = start, rank, world, stop

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.batch):
            g = (step * self.world + self.rank) * self.batch + j   # global sample number
            epoch, pos = divmod(g, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append((int(perm[pos]), int(np.random.SeedSequence([self.seed, g, 7]).generate_state(1)[0])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("infinite sampler")
        return self.stop - self.start
