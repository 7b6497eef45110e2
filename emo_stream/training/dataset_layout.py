"""The on-disk layout of a training set, shared by `prepare` (real videos), the synthetic generator
and the loaders, so one loader reads both.

    OUT/
      dataset.json            size, fps, sample rate, speed buckets, who made it
      manifest.jsonl          one JSON object per clip (ClipRecord), appended as clips finish
      report.json             videos that were skipped and why (prepare only)
      clips/<id>/video.mp4    25 fps, size x size, H.264, no audio (face-centred square crop)
      clips/<id>/audio.wav    16 kHz mono PCM16, exactly frames x 640 samples
      clips/<id>/meta.npz     boxes (T, 4) face box per frame in crop pixels; mask (size, size) union of
                              the boxes; head_pose (T, 3) yaw/pitch/roll; speed (T,) head rotation
                              speed in degrees per frame; speed_bucket (T,) index of the nearest bucket centre;
                              synthetic sets add mouth (T,) the true mouth opening in [0, 1]
      clips/<id>/audio_features.npy   optional cached per-frame audio features (T, ...)
"""

from __future__ import annotations

import json
import logging
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emo_stream.errors import ConfigError

log = logging.getLogger(__name__)

FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS

# Head rotation speed bucket centres in degrees per frame, as the model's speed layers (configs/models/*.yaml
# `speed.centers`; EMO maps speed onto d buckets: s_d = tanh((w - c_d) / r_d * 3)).
DEFAULT_SPEED_CENTERS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)
DEFAULT_SPEED_RADIUS = 0.5


@dataclass
class ClipRecord:
    """One manifest line."""

    id: str
    frames: int
    size: int
    fps: int = FPS
    source: str = ""
    start_s: float = 0.0
    audio_features: bool = False

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "ClipRecord":
        data = json.loads(line)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class DatasetInfo:
    size: int
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE
    speed_centers: list[float] = field(default_factory=lambda: list(DEFAULT_SPEED_CENTERS))
    speed_radius: float = DEFAULT_SPEED_RADIUS
    kind: str = "prepared"  # or "synthetic"


def clip_dir(root: Path, clip_id: str) -> Path:
    return Path(root) / "clips" / clip_id


def speed_to_bucket(speed: np.ndarray, centers=DEFAULT_SPEED_CENTERS) -> np.ndarray:
    """Index of the nearest bucket centre for each rotation speed (degrees per frame)."""
    c = np.asarray(centers, np.float32)
    return np.abs(np.asarray(speed, np.float32)[:, None] - c[None, :]).argmin(axis=1).astype(np.int16)


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


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ConfigError(f"{path}: expected 16 kHz mono PCM16 (re-run prepare)")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def write_clip(root: Path, record: ClipRecord, frames: np.ndarray, audio: np.ndarray, meta: dict) -> None:
    """Write one clip's files; the manifest line is appended separately (by the one process that owns it)."""
    from emo_stream.media import Mp4Writer

    d = clip_dir(root, record.id)
    d.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(d / "video.mp4", fps=record.fps, size=record.size, audio=False, crf=16) as w:
        w.write_frames(frames)
    write_wav(d / "audio.wav", audio)
    np.savez(d / "meta.npz", **meta)


def read_video(path: Path) -> np.ndarray:
    """All frames of a prepared clip, (T, H, W, 3) uint8."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def write_info(root: Path, info: DatasetInfo) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "dataset.json").write_text(json.dumps(asdict(info), indent=2))


def read_info(root: Path) -> DatasetInfo:
    p = Path(root) / "dataset.json"
    if not p.is_file():
        raise ConfigError(f"not a prepared dataset (no dataset.json): {root}; run `emo-stream prepare` first")
    data = json.loads(p.read_text())
    return DatasetInfo(**{k: data[k] for k in DatasetInfo.__dataclass_fields__ if k in data})


def append_manifest(root: Path, records: list[ClipRecord]) -> None:
    p = Path(root) / "manifest.jsonl"
    # a crash mid-write can leave a partial last line: start on a fresh line so it stays isolated
    partial = p.is_file() and p.stat().st_size > 0 and not p.read_bytes().endswith(b"\n")
    with open(p, "a") as f:
        if partial:
            f.write("\n")
        for r in records:
            f.write(r.to_json() + "\n")
        f.flush()


def read_manifest(root: Path) -> list[ClipRecord]:
    p = Path(root) / "manifest.jsonl"
    if not p.is_file():
        return []
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(ClipRecord.from_json(line))
        except (json.JSONDecodeError, TypeError) as exc:
            # a line cut short by a crash is dropped; its video will be prepared again
            log.warning("%s line %d unreadable (%s); ignoring it", p, n, exc.__class__.__name__)
    return out
