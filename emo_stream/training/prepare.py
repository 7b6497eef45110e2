"""`emo-stream prepare`: a folder of talking-head videos -> an EMO training set (see dataset_layout).

Per video: decode with PyAV and resample to 25 fps; cut into segments of --segment-seconds; per
segment detect the face every --detect-every frames (dlib, emo_stream.face) and interpolate the box
in between, run the 68 landmarks on every frame (cheap given a box) for head pose and mouth opening;
crop one face-centred square per segment (fixed, so the crop does not jitter) at the model size;
store face boxes, the union face mask, head rotation speed and its bucket, 16 kHz audio, and
optionally cached audio features. Videos run in parallel worker processes; the parent alone writes
the manifest, so an interrupted run resumes by skipping the videos already listed in the manifest
or the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo_stream.errors import ConfigError, EmoStreamError, OutputError
from emo_stream.face import head_speed
from emo_stream.training.dataset_layout import (FPS, SAMPLES_PER_FRAME, ClipRecord, DatasetInfo, append_manifest,
                                                read_manifest, write_clip, write_info)

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


@dataclass
class PrepareOptions:
    size: int = 512
    segment_seconds: float = 5.0
    min_seconds: float = 1.0       # shorter videos (or tail segments) are skipped: EMO needs f + n frames
    max_seconds: float | None = None
    detect_every: int = 5
    min_face_fraction: float = 0.6  # of detection frames that must find a face
    face_fraction: float = 0.45     # face box width / crop side, as emo_stream.face.crop_portrait


class SkipVideo(Exception):
    """A video that cannot be used; the message goes to the report."""


def _frames_25fps(path: Path, max_seconds: float | None, work_size: int):
    """Yield RGB frames resampled to 25 fps (nearest source frame in time), downscaled so the longer
    side is at most `work_size` (keeps memory bounded for 4K sources; the crop is smaller anyway)."""
    import av
    from PIL import Image

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise SkipVideo(f"corrupt or unreadable ({exc.__class__.__name__})") from None
    with container:
        if not container.streams.video:
            raise SkipVideo("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        k, t0, prev, prev_t = 0, None, None, None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (prev_t + 1 / 25 if prev_t is not None else 0.0)
                if t0 is None:
                    t0 = t
                t -= t0
                img = frame.to_ndarray(format="rgb24")
                turn = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
                if turn:
                    # phone videos store pixels sideways plus a display rotation (degrees counter-clockwise,
                    # as players and FFmpeg apply it): upright faces are what dlib finds
                    img = np.ascontiguousarray(np.rot90(img, k=turn))
                h, w = img.shape[:2]
                s = min(1.0, work_size / max(h, w))
                if s < 1.0:
                    img = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BILINEAR))
                # emit every output time k/25 that this frame is the nearest source frame for
                while prev is not None and k / FPS < t:
                    yield prev if (k / FPS - prev_t) <= (t - k / FPS) else img
                    k += 1
                    if max_seconds and k >= max_seconds * FPS:
                        return
                prev, prev_t = img, t
            if prev is not None and k / FPS <= prev_t + 0.5 / FPS:
                yield prev
        except (av.error.FFmpegError, ValueError) as exc:
            if k == 0:
                raise SkipVideo(f"corrupt video ({exc.__class__.__name__})") from None
            log.warning("%s: decode error after %d frames; keeping those", path, k)


def _probe(path: Path) -> None:
    """Fail fast, with the right reason, on files that are not decodable videos."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise SkipVideo("no video stream")
            next(c.decode(c.streams.video[0]))
    except StopIteration:
        raise SkipVideo("no decodable frames") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise SkipVideo(f"corrupt or unreadable ({exc.__class__.__name__})") from None


def _track_faces(frames: list[np.ndarray], analyzer, detect_every: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Boxes (T, 4) and landmarks (T, 68, 2) in frame pixels; detection on every `detect_every`-th
    frame, boxes linearly interpolated between detections. Returns the fraction of detections that hit."""
    n = len(frames)
    keys = list(range(0, n, detect_every))
    if keys[-1] != n - 1:
        keys.append(n - 1)
    found: dict[int, np.ndarray] = {}
    for i in keys:
        face = analyzer.detect(frames[i])
        if face is not None:
            found[i] = face.box
    hit = len(found) / len(keys)
    if not found:
        return np.zeros((n, 4), np.float32), np.zeros((n, 68, 2), np.float32), 0.0
    idx = np.array(sorted(found))
    boxes_at = np.stack([found[i] for i in idx])
    boxes = np.stack([np.interp(np.arange(n), idx, boxes_at[:, j]) for j in range(4)], axis=1).astype(np.float32)
    lms = np.stack([analyzer.landmarks(frames[i], boxes[i]) for i in range(n)])
    return boxes, lms, hit


def _crop_square(box: np.ndarray, shape: tuple[int, int], face_fraction: float) -> tuple[float, float, float]:
    """(x0, y0, side) of the face-centred square, as crop_portrait places it (face a little above centre)."""
    h, w = shape
    fw = float(box[2] - box[0])
    side = max(min(fw / face_fraction, max(h, w) * 1.0), fw * 1.2)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2 + 0.1 * side * 0.5
    return cx - side / 2, cy - side / 2, side


def _crop(frame: np.ndarray, x0: float, y0: float, side: float, size: int) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    pad = int(np.ceil(max(0, -x0, -y0, x0 + side - w, y0 + side - h))) + 1
    src = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad > 1 else frame
    off = pad if pad > 1 else 0
    img = Image.fromarray(src).resize((size, size), Image.LANCZOS, box=(x0 + off, y0 + off, x0 + off + side,
                                                                        y0 + off + side))
    return np.asarray(img)


def prepare_video(path: Path, out: Path, clip_prefix: str, opts: PrepareOptions,
                  audio_encoder=None) -> list[ClipRecord]:
    """Prepare one video into clips under `out`. Raises SkipVideo when nothing usable is in it."""
    from emo_stream.errors import AudioInputError
    from emo_stream.face import FaceAnalyzer, FaceInfo, face_region_mask
    from emo_stream.media import load_audio

    _probe(path)
    analyzer = FaceAnalyzer()
    try:
        audio = load_audio(path)
    except AudioInputError as exc:
        raise SkipVideo(f"no usable audio ({exc})") from None
    seg_len = max(1, int(round(opts.segment_seconds * FPS)))
    min_len = max(1, int(round(opts.min_seconds * FPS)))
    records: list[ClipRecord] = []
    reasons: list[str] = []
    total = 0

    def flush(frames: list[np.ndarray], first: int) -> None:
        if len(frames) < min_len:
            reasons.append(f"segment at {first / FPS:.1f}s too short ({len(frames) / FPS:.2f}s)")
            return
        boxes, lms, hit = _track_faces(frames, analyzer, opts.detect_every)
        if hit < opts.min_face_fraction:
            reasons.append(f"segment at {first / FPS:.1f}s: face found in {hit:.0%} of checks")
            return
        x0, y0, side = _crop_square(np.median(boxes, axis=0), frames[0].shape[:2], opts.face_fraction)
        scale = opts.size / side
        crop = np.stack([_crop(f, x0, y0, side, opts.size) for f in frames])
        shift = np.array([x0, y0, x0, y0], np.float32)
        cboxes = ((boxes - shift) * scale).astype(np.float32)
        faces = [FaceInfo(box=b, landmarks=lm) for b, lm in zip(boxes, lms)]
        poses = np.stack([f.head_pose() for f in faces])
        speed = head_speed(poses)
        a = audio[first * SAMPLES_PER_FRAME:(first + len(frames)) * SAMPLES_PER_FRAME]
        a = np.pad(a, (0, len(frames) * SAMPLES_PER_FRAME - len(a)))
        rec = ClipRecord(id=f"{clip_prefix}_{len(records):03d}", frames=len(frames), size=opts.size,
                         source=str(path), start_s=first / FPS)
        meta = dict(boxes=cboxes, mask=face_region_mask(cboxes, opts.size).astype(np.uint8), head_pose=poses,
                    speed=speed,
                    mouth_opening=np.array([f.mouth_opening() for f in faces], np.float32))
        write_clip(out, rec, crop, a, meta)
        if audio_encoder is not None:
            feats = audio_encoder(a, len(frames))
            np.save(out / "clips" / rec.id / "audio_features.npy", feats)
            rec.audio_features = True
        records.append(rec)

    seg: list[np.ndarray] = []
    first = 0
    for img in _frames_25fps(path, opts.max_seconds, work_size=max(2 * opts.size, 512)):
        seg.append(img)
        total += 1
        if len(seg) == seg_len:
            flush(seg, first)
            first += len(seg)
            seg = []
    if seg:
        flush(seg, first)
    if total == 0:
        raise SkipVideo("no decodable frames")
    if not records:
        if total < min_len:
            raise SkipVideo(f"too short ({total / FPS:.2f}s < {opts.min_seconds}s)")
        raise SkipVideo("no usable segment: " + "; ".join(reasons[:3]))
    return records


def _worker(args: tuple) -> tuple[str, list[ClipRecord] | None, str | None]:
    path, out, prefix, opts, features_model = args
    logging.basicConfig(level=logging.WARNING)
    # outside the try: a bad --audio-features model is no fault of this video; it stops the run (reported
    # as one line) instead of marking every video skipped, which a re-run would then never retry
    encoder = _load_audio_encoder(features_model) if features_model else None
    try:
        return str(path), prepare_video(Path(path), Path(out), prefix, opts, encoder), None
    except SkipVideo as exc:
        return str(path), None, str(exc)
    except Exception as exc:  # one bad video must not stop a long run; it goes to the report
        log.exception("failed on %s", path)
        return str(path), None, f"error: {exc.__class__.__name__}: {exc}"


def _load_audio_encoder(model: str):
    """A callable (audio 16 kHz, num_frames) -> per-frame features, from an EMO model's audio encoder."""
    from emo_stream.training.model_adapter import audio_feature_fn

    return audio_feature_fn(model)


def _clip_prefix(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return "_".join(rel.parts).replace(" ", "_")


def prepare_dataset(videos: Path, out: Path, opts: PrepareOptions, workers: int = 1,
                    audio_features_model: str | None = None, progress: bool = True) -> dict:
    """Prepare every video under `videos` into `out`. Returns the summary also written to report.json."""
    from tqdm import tqdm

    videos, out = Path(videos), Path(out)
    if not videos.is_dir():
        raise ConfigError(f"--videos is not a folder: {videos}")
    paths = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    if not paths:
        raise ConfigError(f"no videos ({', '.join(VIDEO_EXTS)}) under {videos}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write the dataset to {out}: {exc.strerror or exc.__class__.__name__}") from None
    info_path = out / "dataset.json"
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("size") != opts.size:
            raise ConfigError(f"{out} was prepared at size {old.get('size')}, not {opts.size}: use another --out")
    write_info(out, DatasetInfo(size=opts.size))
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"skipped": {}}
    done = {r.source for r in read_manifest(out)} | set(report["skipped"])
    todo = [p for p in paths if str(p) not in done]
    log.info("%d videos, %d already done, %d to prepare with %d workers", len(paths), len(paths) - len(todo),
             len(todo), workers)
    jobs = [(str(p), str(out), _clip_prefix(p, videos), opts, audio_features_model) for p in todo]
    new_clips = 0

    def record(path: str, recs, reason) -> None:
        nonlocal new_clips
        if recs:
            append_manifest(out, recs)
            new_clips += len(recs)
        else:
            report["skipped"][path] = reason
            log.warning("skipped %s: %s", path, reason)
            report_path.write_text(json.dumps(report, indent=2))

    with tqdm(total=len(jobs), unit="video", desc="preparing", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                record(*_worker(job))
                bar.update(1)
        else:
            import multiprocessing as mp

            # spawn: dlib and torch are not fork-safe once threads exist
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_worker, job) for job in jobs]
                for fut in as_completed(futures):
                    try:
                        result = fut.result()
                    except BaseException:
                        for other in futures:
                            other.cancel()
                        raise
                    record(*result)
                    bar.update(1)
    clips = read_manifest(out)
    report.update(videos=len(paths), clips=len(clips), new_clips=new_clips,
                  hours=round(sum(c.seconds for c in clips) / 3600, 4))
    report_path.write_text(json.dumps(report, indent=2))
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", required=True, help="folder of talking-head videos (searched recursively)")
    p.add_argument("--out", required=True, help="output dataset folder (re-running resumes)")
    p.add_argument("--size", type=int, default=512, help="model size: crops are size x size")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel processes")
    p.add_argument("--segment-seconds", type=float, default=5.0, help="clip length; longer videos are split")
    p.add_argument("--min-seconds", type=float, default=1.0, help="skip videos/segments shorter than this")
    p.add_argument("--max-seconds", type=float, default=None, help="use at most this much of each video")
    p.add_argument("--detect-every", type=int, default=5, help="run face detection every N frames, track between")
    p.add_argument("--audio-features", metavar="MODEL", default=None,
                   help="also cache per-frame audio features with this EMO model's audio encoder")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.size < 32 or args.size % 8:
        raise ConfigError(f"--size must be a multiple of 8 and >= 32, got {args.size}")
    if args.detect_every < 1 or args.workers < 1:
        raise ConfigError("--detect-every and --workers must be >= 1")
    if not args.min_seconds >= 0:
        raise ConfigError(f"--min-seconds must be >= 0: got {args.min_seconds}")
    if not (args.segment_seconds > 0 and args.segment_seconds >= args.min_seconds):
        # else every segment would be skipped as too short
        raise ConfigError(f"--segment-seconds must be > 0 and at least --min-seconds ({args.min_seconds}): "
                          f"got {args.segment_seconds}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ConfigError(f"--max-seconds must be > 0 (leave it out to use whole videos): got {args.max_seconds}")
    opts = PrepareOptions(size=args.size, segment_seconds=args.segment_seconds, min_seconds=args.min_seconds,
                          max_seconds=args.max_seconds, detect_every=args.detect_every)
    summary = prepare_dataset(Path(args.videos), Path(args.out), opts, workers=args.workers,
                              audio_features_model=args.audio_features, progress=not args.no_progress)
    if not summary["clips"]:
        # an empty dataset only fails later, in `train`: say now why nothing was usable
        first = next(iter(summary["skipped"].items()), None)
        example = f" (e.g. {Path(first[0]).name}: {first[1]})" if first else ""
        raise EmoStreamError(f"no usable clips: all {summary['videos']} video(s) were skipped{example}; "
                             f"reasons in {Path(args.out) / 'report.json'}")
    log.info("%d clips (%.2f h) in %s; %d videos skipped (see %s/report.json)", summary["clips"], summary["hours"],
             args.out, len(summary["skipped"]), args.out)
    return 0
