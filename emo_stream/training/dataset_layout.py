"""The on-disk layout of a training set, shared by `prepare` (real videos), the synthetic generator
and the loaders, so one loader reads both.

    OUT/
      dataset.json            size, fps, sample rate, who made it
      manifest.jsonl          one JSON object per clip (ClipRecord), appended as clips finish
      report.json             videos that were skipped and why (prepare only)
      clips/<id>/video.mp4    25 fps, size x size, H.264, no audio (face-centred square crop)
      clips/<id>/audio.wav    16 kHz mono PCM16, exactly frames x 640 samples
      clips/<id>/meta.npz     boxes (T, 4) face box per frame in crop pixels; mask (size, size) union of
                              the boxes; head_pose (T, 3) yaw/pitch/roll; speed (T,) head rotation
                              speed in degrees per frame (emo_stream.face.head_speed);
                              synthetic sets add mouth (T,) the true mouth opening in [0, 1]
      clips/<id>/audio_features.npy   optional cached per-frame audio features (T, ...)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emo_stream.errors import ConfigError
from emo_stream.pcm import read_wav16, write_wav16
from emo_stream.timeline import DEFAULT_FPS, SAMPLE_RATE, samples_per_frame

log = logging.getLogger(__name__)

FPS = DEFAULT_FPS
SAMPLES_PER_FRAME = samples_per_frame(FPS)
# head speed per frame: emo_stream.face.head_speed (one definition for preparing data and the model's unit);
# its bucketing lives in the model config (configs/models/*.yaml `speed.centers`), not in the dataset


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
    kind: str = "prepared"  # or "synthetic"


def clip_dir(root: Path, clip_id: str) -> Path:
    return Path(root) / "clips" / clip_id


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    write_wav16(path, np.asarray(audio, np.float32), rate)


def read_wav(path: Path) -> np.ndarray:
    return read_wav16(path, ConfigError, " (re-run prepare)")


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
