"""A synthetic talking-face dataset: procedural cartoon faces whose mouth opening follows the envelope of
espeak-ng speech, with small head motion and blinks. It is written in the `prepare` layout
(dataset_layout), so the training loaders read it like real data.

Its point is a cheap, exact test that training learns audio -> lip sync: the true mouth opening of
every frame is known (meta `mouth_opening`), and `mouth_darkness()` measures the opening of any frame
drawn in this layout (also a generated one) from the dark area in the known mouth region.

    python -m emo_stream.training.synthetic --out data/synth --clips 64 --size 64
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo_stream.errors import ConfigError
from emo_stream.face import head_speed
from emo_stream.training.dataset_layout import (FPS, SAMPLES_PER_FRAME, ClipRecord, DatasetInfo, append_manifest,
                                                write_clip, write_info)

log = logging.getLogger(__name__)

# Face layout in units of the frame side (the head moves around it by at most HEAD_SHIFT).
FACE_CENTER = (0.5, 0.5)
FACE_RADII = (0.32, 0.40)
EYE_Y, EYE_DX, EYE_R = 0.40, 0.13, 0.05
MOUTH_CENTER = (0.5, 0.68)
MOUTH_HALF_W = 0.15
MOUTH_HALF_H = (0.012, 0.11)   # closed, fully open
HEAD_SHIFT = 0.025
MOUTH_REGION = (0.5 - 0.22, 0.68 - 0.16, 0.5 + 0.22, 0.68 + 0.16)  # x0, y0, x1, y1: holds the mouth at any pose

WORDS = ("hello world today music people river morning happy window summer garden pocket yellow table "
         "animal forest number paper winter doctor orange silver mountain picture water family letter "
         "bottle button candle monkey pencil rocket tomato violin wonder zebra open mouth talking again "
         "maybe always never quickly slowly beautiful").split()
VOICES = ("en", "en-us", "en-gb", "en-sc")


@dataclass
class Identity:
    skin: tuple[int, int, int]
    background: tuple[int, int, int]
    hair: tuple[int, int, int]
    eye: tuple[int, int, int]
    lips: tuple[int, int, int]
    face_scale: float


def random_identity(rng: np.random.Generator) -> Identity:
    skin = tuple(int(v) for v in rng.integers([150, 110, 80], [255, 210, 180]))
    bg = tuple(int(v) for v in rng.integers(0, 120, 3) + rng.integers(0, 2) * 120)
    hair = tuple(int(v) for v in rng.integers(0, 110, 3))
    return Identity(skin=skin, background=bg, hair=hair, eye=(20, 20, 30),
                    lips=tuple(int(v) for v in rng.integers([150, 30, 40], [220, 80, 100])),
                    face_scale=float(rng.uniform(0.93, 1.05)))


def speech_envelope(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Per-frame loudness in [0, 1]: RMS of the 640 samples each 25 fps frame covers, over the clip's
    95th percentile, lightly smoothed. The mouth follows this; the sync benchmark correlates with it."""
    a = np.pad(np.asarray(audio, np.float32), (0, max(0, num_frames * SAMPLES_PER_FRAME - len(audio))))
    rms = np.sqrt((a[:num_frames * SAMPLES_PER_FRAME].reshape(num_frames, -1) ** 2).mean(axis=1))
    ref = np.percentile(rms, 95) if num_frames else 1.0
    env = np.clip(rms / max(ref, 1e-4), 0, 1)
    if num_frames >= 3:
        env = np.convolve(np.pad(env, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    return env.astype(np.float32)


def espeak_speech(text: str, voice: str = "en", speed: int = 150, pitch: int = 50) -> np.ndarray:
    """16 kHz mono speech from espeak-ng."""
    from emo_stream.media import load_audio

    if shutil.which("espeak-ng") is None:
        raise ConfigError("espeak-ng is not installed (apt-get install espeak-ng): needed for synthetic speech")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
                       check=True, capture_output=True)
        return load_audio(wav)


def random_speech(rng: np.random.Generator, max_seconds: float) -> np.ndarray:
    """A few random phrases separated by pauses, so the envelope has both speech and silence."""
    parts = [np.zeros(int(rng.uniform(0.1, 0.4) * 16000), np.float32)]
    voice, speed, pitch = str(rng.choice(VOICES)), int(rng.integers(130, 190)), int(rng.integers(30, 70))
    while sum(len(p) for p in parts) < max_seconds * 16000:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        parts.append(espeak_speech(text, voice, speed, pitch))
        parts.append(np.zeros(int(rng.uniform(0.2, 0.7) * 16000), np.float32))
    audio = np.concatenate(parts)[: int(max_seconds * 16000)]
    return (audio / max(np.abs(audio).max(), 1e-4) * 0.8).astype(np.float32)


def draw_face(ident: Identity, size: int, mouth: float, eyes: float, dx: float = 0.0, dy: float = 0.0,
              roll: float = 0.0, supersample: int = 4) -> np.ndarray:
    """One RGB frame. mouth in [0, 1] (closed..open), eyes in [0, 1] (closed..open), dx/dy shifts in
    frame units, roll in radians."""
    from PIL import Image, ImageDraw

    S = size * supersample
    img = Image.new("RGB", (S, S), ident.background)
    d = ImageDraw.Draw(img)

    def box(cx, cy, rx, ry):
        return [(cx - rx) * S, (cy - ry) * S, (cx + rx) * S, (cy + ry) * S]

    fx, fy = FACE_CENTER
    rx, ry = FACE_RADII[0] * ident.face_scale, FACE_RADII[1] * ident.face_scale
    d.ellipse(box(fx, fy - 0.06, rx * 1.08, ry * 0.95), fill=ident.hair)           # hair behind the face
    d.ellipse(box(fx, fy, rx, ry), fill=ident.skin)
    eh = max(EYE_R * 0.8 * eyes, 0.006)
    for sx in (-1, 1):
        d.ellipse(box(fx + sx * EYE_DX, EYE_Y, EYE_R, eh), fill=ident.eye)
    d.line([(fx * S, 0.47 * S), (fx * S, 0.56 * S)], fill=tuple(int(c * 0.75) for c in ident.skin),
           width=max(1, S // 60))
    mx, my = MOUTH_CENTER
    mh = MOUTH_HALF_H[0] + (MOUTH_HALF_H[1] - MOUTH_HALF_H[0]) * float(np.clip(mouth, 0, 1))
    d.ellipse(box(mx, my, MOUTH_HALF_W, mh + 0.012), fill=ident.lips)
    d.ellipse(box(mx, my, MOUTH_HALF_W * 0.85, mh), fill=(35, 8, 15))
    if roll:
        img = img.rotate(np.degrees(roll), resample=Image.BICUBIC, center=(fx * S, fy * S), fillcolor=ident.background)
    if dx or dy:
        img = img.transform(img.size, Image.AFFINE, (1, 0, -dx * S, 0, 1, -dy * S), resample=Image.BILINEAR,
                            fillcolor=ident.background)
    return np.asarray(img.resize((size, size), Image.LANCZOS))


def mouth_darkness(frames: np.ndarray) -> np.ndarray:
    """Mouth opening of frames in the synthetic layout: the dark share of the mouth region relative to
    the region's median (skin) brightness. Works on blurry generated frames too (it is a mean, not a
    threshold count), and at 32-64 px. frames: (T, H, W, 3) uint8 -> (T,) float."""
    frames = np.asarray(frames, np.float32)
    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = MOUTH_REGION
    region = frames[:, int(y0 * h):int(np.ceil(y1 * h)), int(x0 * w):int(np.ceil(x1 * w))]
    lum = region @ np.array([0.299, 0.587, 0.114], np.float32)
    skin = np.median(lum.reshape(len(lum), -1), axis=1)[:, None, None]
    return np.clip((skin - lum) / np.maximum(skin, 1.0), 0, 1).mean(axis=(1, 2))


def make_clip(rng: np.random.Generator, ident: Identity, size: int, seconds: float,
              audio: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(frames, audio, meta) of one synthetic clip."""
    from emo_stream.face import face_region_mask

    if audio is None:
        audio = random_speech(rng, seconds)
    n = max(1, len(audio) // SAMPLES_PER_FRAME)
    audio = audio[: n * SAMPLES_PER_FRAME]
    mouth = speech_envelope(audio, n)
    t = np.arange(n) / FPS
    f1, f2, f3 = rng.uniform(0.15, 0.6, 3)
    p1, p2, p3 = rng.uniform(0, 2 * np.pi, 3)
    dx = HEAD_SHIFT * np.sin(2 * np.pi * f1 * t + p1)
    dy = HEAD_SHIFT * 0.6 * np.sin(2 * np.pi * f2 * t + p2)
    roll = 0.06 * np.sin(2 * np.pi * f3 * t + p3)
    eyes = np.ones(n, np.float32)
    k = int(rng.integers(5, 40))
    while k < n:  # blinks: ~4 frames, every 2-4 s
        for j, v in enumerate((0.5, 0.05, 0.05, 0.5)):
            if k + j < n:
                eyes[k + j] = v
        k += int(rng.integers(50, 100))
    frames = np.stack([draw_face(ident, size, mouth[i], eyes[i], dx[i], dy[i], roll[i]) for i in range(n)])
    rx, ry = FACE_RADII[0] * ident.face_scale, FACE_RADII[1] * ident.face_scale
    boxes = np.stack([(FACE_CENTER[0] + dx - rx), (FACE_CENTER[1] + dy - ry), (FACE_CENTER[0] + dx + rx),
                      (FACE_CENTER[1] + dy + ry)], axis=1).astype(np.float32) * size
    poses = np.stack([np.zeros(n), np.zeros(n), roll], axis=1).astype(np.float32)
    speed = head_speed(poses, smooth=1)
    meta = dict(boxes=boxes, mask=face_region_mask(boxes, size).astype(np.uint8), head_pose=poses, speed=speed,
                mouth_opening=mouth, eyes=eyes)
    return frames, audio, meta


def generate_dataset(out: Path, clips: int = 32, size: int = 64, seconds: float = 4.0, identities: int = 4,
                     seed: int = 0, progress: bool = False) -> list[ClipRecord]:
    """Write `clips` synthetic clips (cycling over `identities` faces) to `out` in the prepare layout."""
    from tqdm import tqdm

    if clips < 1 or identities < 1 or size < 16 or seconds < 0.8:
        raise ConfigError("synthetic dataset: need clips >= 1, identities >= 1, size >= 16, seconds >= 0.8")
    out = Path(out)
    write_info(out, DatasetInfo(size=size, kind="synthetic"))
    rng = np.random.default_rng(seed)
    idents = [random_identity(rng) for _ in range(identities)]
    records = []
    for i in tqdm(range(clips), desc="synthetic clips", disable=not progress):
        crng = np.random.default_rng([seed, i])
        frames, audio, meta = make_clip(crng, idents[i % identities], size, seconds)
        rec = ClipRecord(id=f"synth_{i:04d}", frames=len(frames), size=size, source=f"synthetic:{seed}:{i}")
        write_clip(out, rec, frames, audio, meta)
        records.append(rec)
    append_manifest(out, records)
    return records


def identity_reference(size: int, seed: int = 0, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(frame, face box) of identity `index` of the dataset generated with `seed`: mouth closed, eyes open,
    head centred. A ready-made avatar crop for the EMO backend (`avatar_from_crop`)."""
    rng = np.random.default_rng(seed)
    ident = [random_identity(rng) for _ in range(index + 1)][index]
    rx, ry = FACE_RADII[0] * ident.face_scale, FACE_RADII[1] * ident.face_scale
    box = np.array([FACE_CENTER[0] - rx, FACE_CENTER[1] - ry, FACE_CENTER[0] + rx, FACE_CENTER[1] + ry]) * size
    return draw_face(ident, size, mouth=0.0, eyes=1.0), box.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a synthetic talking-face training set")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--identities", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    recs = generate_dataset(Path(args.out), args.clips, args.size, args.seconds, args.identities, args.seed,
                            progress=True)
    log.info("wrote %d clips to %s", len(recs), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
