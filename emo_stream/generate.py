"""Offline generation: portrait + audio file -> MP4, with any backend (`emo-stream generate`).

The audio is cut into segments of the backend's clip length; each segment is conditioned on the
previous one through the backend's state (EMO: the last n frames as motion frames), so any duration
works and memory stays flat: frames go to the MP4 writer as soon as they exist.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from emo_stream.backend import Backend, SegmentJob, capabilities
from emo_stream.registry import create_backend, default_backend, family_names, model_options
from emo_stream.errors import ConfigError, ImageInputError, OutputError
from emo_stream.media import Mp4Writer, is_video_path, load_audio, load_image, load_video
from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

log = logging.getLogger(__name__)


def frame_count(num_samples: int, fps: int) -> int:
    """Frames covering an audio of `num_samples` at 16 kHz: round(duration x fps), at least one."""
    return max(1, int(round(num_samples * fps / SAMPLE_RATE)))


def iter_segments(backend: Backend, avatar, audio: np.ndarray, seed: int = 0,
                  clip_frames: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (frames, audio they cover) per clip. The audio slices, concatenated, are the input audio
    trimmed or zero-padded to a whole number of frames."""
    spf = samples_per_frame(backend.fps)
    clip = clip_frames or capabilities(backend).clip_frames
    total = frame_count(len(audio), backend.fps)
    lookahead = backend.audio_context.lookahead_frames * spf
    # zero padding: the last frame's samples and the encoder's look-ahead past the end
    padded = np.concatenate([audio[: total * spf], np.zeros(total * spf - min(len(audio), total * spf) + lookahead,
                                                              np.float32)])
    state = backend.new_state(avatar, seed)
    for first in range(0, total, clip):
        n = min(clip, total - first)
        start = first * spf
        lo = backend.audio_context.window_start(start)
        window = padded[lo:start + n * spf + lookahead]
        features = backend.encode_audio(window, start - lo, n)
        frames = backend.generate([SegmentJob(avatar=avatar, state=state, features=features, num_frames=n)])[0]
        yield frames, padded[start:start + n * spf]


def generate_file(backend: Backend, image: str | Path | np.ndarray, audio: str | Path | np.ndarray,
                  out_path: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Render a portrait (path or RGB array) speaking an audio (path, or 16 kHz mono float32 array) into
    `out_path` (H.264 + AAC). Backends with video_avatars also take a short idle video (a video file, or
    (T, H, W, 3) frames). Returns a summary."""
    from tqdm import tqdm

    if not isinstance(image, np.ndarray):
        image = load_avatar(backend, image)
    if not isinstance(audio, np.ndarray):
        audio = load_audio(audio)
    avatar = backend.prepare_avatar(image)
    total = frame_count(len(audio), backend.fps)
    written = 0
    if capabilities(backend).whole_video:
        # sampled over the whole video first (one bar per stage), then decoded and written chunk by chunk
        bars: dict = {}

        def report(stage: str, done: int, stage_total: int) -> None:
            if stage not in bars:
                for b in bars.values():
                    b.close()
                bars[stage] = tqdm(total=stage_total, desc=stage, unit="call" if stage == "denoise" else "frame",
                                   disable=not progress)
            bars[stage].update(done - bars[stage].n)

        chunks = backend.render_video(avatar, audio, seed=seed, progress=report)
    else:
        bars = {"generating": tqdm(total=total, unit="frame", desc="generating", disable=not progress)}
        report = None
        chunks = iter_segments(backend, avatar, audio, seed=seed)
    try:
        with Mp4Writer(out_path, fps=backend.fps, size=backend.size) as writer:
            for frames, chunk in chunks:
                writer.write_frames(frames)
                writer.write_audio(chunk)
                written += len(frames)
                if report is None:
                    bars["generating"].update(len(frames))
    finally:
        for b in bars.values():
            b.close()
    return {"frames": written, "seconds": written / backend.fps, "out": str(out_path)}


def load_avatar(backend: Backend, path: str | Path) -> np.ndarray:
    """A portrait file as (H, W, 3), or, for backends that take video avatars, a video file as (T, H, W, 3)
    frames at the backend's rate (the first seconds: media.VIDEO_AVATAR_MAX_SECONDS)."""
    if not is_video_path(path):
        return load_image(path)
    if not capabilities(backend).video_avatars:
        raise ConfigError(f"{path} is a video: the {capabilities(backend).name} backend animates a portrait photo "
                          f"(video avatars: --backend musetalk)")
    return load_video(path, fps=backend.fps)


MP4_SUFFIXES = ("", ".mp4", ".m4v")  # what the writer makes is MP4 (H.264 + AAC) whatever the name says


def check_writable(path: str | Path) -> None:
    """Fail early, in one line, when the output file cannot be created where and as asked."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if path.suffix.lower() not in MP4_SUFFIXES:
        raise OutputError(f"cannot write {path}: the output is an MP4 (H.264 + AAC); name it with .mp4, "
                          f"not {path.suffix}")
    parent = path.absolute().parent
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is not a folder")
    if ancestor != parent:  # a typo in the folder would otherwise quietly create a new tree
        raise OutputError(f"cannot write {path}: the folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="portrait photo (any size; one clearly visible face), or for "
                                                  "musetalk a short idle video of the person (played forward "
                                                  "then backward)")
    p.add_argument("--audio", required=True, help="speech or singing: wav, mp3, m4a, ... any rate, mono or stereo")
    p.add_argument("--out", required=True, help="output MP4 (H.264 + AAC)")
    p.add_argument("--backend", choices=family_names(), default=None,
                   help="default: the one that runs --model's family (emo, echomimic, hallo, musetalk), "
                        "else the CPU preview animator")
    p.add_argument("--model", default=None, help="model: an EchoMimic, Hallo or MuseTalk download folder, an emo-stream "
                                                 "checkpoint folder, or a preset (tiny, sd15)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the model's: EMO 40, EchoMimic acc 6, normal 30, Hallo 40)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none; default: the model's)")
    p.add_argument("--decoder", choices=["vae", "taesd"], default=None, help="latent decoder: the model's VAE or TAESD")
    p.add_argument("--weights", "--weights-set", dest="weights", choices=["acc", "normal"], default=None,
                   help="EchoMimic: which weights set of the folder (default: acc when present)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same video")
    p.add_argument("--fps", type=int, default=None,
                   help="video frame rate (default: the model's: EMO and Hallo 25, EchoMimic 24)")
    p.add_argument("--size", type=int, default=512, help="output width and height in pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # inputs and the output place are checked before the model loads (minutes for sd15)
    video = is_video_path(args.image)
    if video and not Path(args.image).is_file():
        raise ImageInputError(f"video not found: {args.image}")
    image, audio = (None if video else load_image(args.image)), load_audio(args.audio)
    check_writable(args.out)
    options = model_options(args.backend or default_backend(args.model), steps=args.steps, guidance=args.guidance,
                            decoder=args.decoder, weights=args.weights)
    backend = create_backend(args.backend, args.model, size=args.size, fps=args.fps, device=args.device,
                             **options)
    if video:
        image = load_avatar(backend, args.image)
    summary = generate_file(backend, image, audio, args.out, seed=args.seed, progress=not args.no_progress)
    log.info("wrote %s: %d frames, %.2f s", summary["out"], summary["frames"], summary["seconds"])
    return 0
