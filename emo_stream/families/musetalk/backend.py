"""MuseTalkBackend: MuseTalk 1.5 behind the backend contract (emo_stream.backend), offline and live.

    backend = create_backend(model="MuseTalk/models")     # the download folder as it comes, or our checkpoint
    avatar = backend.prepare_avatar(rgb)                   # a portrait (H, W, 3) or an idle video (T, H, W, 3)
    frames = backend.generate([SegmentJob(avatar, state, backend.encode_audio(window, start, n), n), ...])

Frames: the avatar's base frames (the portrait, its preview-animated idle loop, or the video, played forward
then backward) with the lower face repainted: one UNet call at t = 0 per frame, all jobs' frames in one batch,
one batched VAE decode, then the crops pasted back with the prepared masks by tensor ops on the model's device
(cv2's bilinear resize and PIL's mask paste computed exactly, so equal to MuseTalk's realtime blending).

Offline (`render_video`): MuseTalk's own audio path (whisper over the whole file in 30 s segments) and its
realtime blending. Live (`encode_audio`, `encode_audio_batch`): the same 30 s grid over the session's audio:
each call encodes the segment(s) its frames' prompts touch with the samples received so far, zero-padded as
MuseTalk pads a file (the window starts on the grid: AudioContext.align_samples); every session's segments go
through whisper in one call. docs/musetalk.md has the measurement (the error left is the audio not yet
received; `extra_lookahead_frames` waits for more of it). Idle (silence): the same frames with silent audio,
rendered once per base frame and reused, so an idle session costs nothing after its first loop.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from emo_stream.backend import BackendBase, SegmentJob
from emo_stream.blocks.checks import check_fps
from emo_stream.errors import ConfigError, ImageInputError
from emo_stream.execution import BATCH_BUCKETS, bucket_size, pad_rows
from emo_stream.families.musetalk import audio as audio_mod
from emo_stream.families.musetalk.avatar import MuseTalkAvatar, content_key, default_cache_dir, restore, store
from emo_stream.families.musetalk.blending import paste_one
from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

log = logging.getLogger(__name__)

EXTRA_LOOKAHEAD_FRAMES = 1  # live: audio waited for past the prompts' reach: their mel and conv inputs complete
                            # (docs/musetalk.md, bench/results/musetalk_window.json)
FACE_FRACTION = 0.45       # framing: the face box takes this share of the output width
MAX_BATCH_FRAMES = 48      # frames per UNet + decode call (bounds activation memory; more frames: more calls)
PORTRAIT_MOTIONS = ("still", "preview")


@dataclass
class MuseTalkState:
    avatar: MuseTalkAvatar
    seed: int
    position: int = 0          # frames played so far: where in the base loop the next frame is


@dataclass
class _Denoised:
    """What denoise hands to decode: the predicted latents of the frames to render, and per job which rows."""

    latents: torch.Tensor | None            # (rows, 4, h, w)
    per_job: list[list[tuple[int, int, int]]]  # per job: (cycle index, row in latents or -1 (idle cache hit), idle)


class MuseTalkBackend(BackendBase):
    """Options: segment_frames (live segment), clip_frames (offline chunk), extra_lookahead_frames (live: frames
    of audio waited for past the prompts' reach, so whisper sees more of its 30 s segment: 40 ms of latency
    each), portrait_motion ("preview", the default: a photo gets the preview animator's idle head motion
    and blinks under the repainted mouth; "still": the photo as it is), motion_seconds (length of that idle
    loop), cache_dir (prepared avatars on disk; "" for none), max_batch_frames."""

    name = "musetalk"
    video_avatars = True

    def __init__(self, model, size: int = 512, fps: int = 25, *, segment_frames: int = 5, clip_frames: int = 25,
                 extra_lookahead_frames: int = EXTRA_LOOKAHEAD_FRAMES, portrait_motion: str = "preview",
                 motion_seconds: float = 4.0, cache_dir: str | Path | None = None,
                 max_batch_frames: int = MAX_BATCH_FRAMES, model_id: str = "",
                 face_analyzer=None, compile: str = "off"):
        if size < 64 or size > 2048 or size % 2:
            raise ConfigError(f"size must be an even number of pixels between 64 and 2048: got {size}")
        check_fps(fps)
        if portrait_motion not in PORTRAIT_MOTIONS:
            raise ConfigError(f"portrait_motion must be one of {', '.join(PORTRAIT_MOTIONS)}: got {portrait_motion!r}")
        if segment_frames < 1 or clip_frames < 1 or max_batch_frames < 1:
            raise ConfigError("segment_frames, clip_frames and max_batch_frames must be >= 1")
        if not 0 < motion_seconds <= 20:
            raise ConfigError(f"motion_seconds must be above 0 and at most 20: got {motion_seconds}")
        if not isinstance(extra_lookahead_frames, int) or not 0 <= extra_lookahead_frames <= 250:
            raise ConfigError(f"extra_lookahead_frames must be an integer between 0 and 250: "
                              f"got {extra_lookahead_frames!r}")
        self.model = model
        self.size, self.fps = int(size), int(fps)
        self.stream_segment_frames = int(segment_frames)
        self.clip_frames = int(clip_frames)
        self.max_batch_frames = int(max_batch_frames)
        self.portrait_motion = portrait_motion
        self.motion_seconds = float(motion_seconds)
        self.device = model.device
        self.model_id = model_id
        self.cache_dir = default_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)
        self.compile = self._compile(compile)
        # compiled: every UNet / decode call padded to a bucket (rows = frames of all sessions, idle ones skipped)
        self.batch_buckets: tuple[int, ...] = BATCH_BUCKETS if self.compile != "off" else ()
        self._face_analyzer = face_analyzer
        self._audio_lock = threading.Lock()   # encode_audio may run beside generate: whisper is shared
        self._silence: torch.Tensor | None = None
        cfg = model.config
        self.left, self.right = cfg.audio_padding_left, cfg.audio_padding_right
        self.audio_context = audio_mod.live_context(self.fps, self.left, self.right, extra_lookahead_frames)

    def _compile(self, mode: str) -> str:
        from emo_stream.execution import ExecutionOptions, compile_forward

        ExecutionOptions(compile=mode).validate()
        if mode != "off" and self.device.type != "cuda":
            log.warning("compile=%s asked for on %s: torch.compile is used on CUDA only; running eagerly", mode,
                        self.device)
            return "off"
        if mode != "off":
            compile_forward(self.model.unet, mode, "MuseTalk UNet")
            compile_forward(self.model.vae.decoder, mode, "MuseTalk VAE decoder")
        return mode

    def _chunks(self, rows: int) -> Iterator[tuple[int, int, int]]:
        """(first, end, padded rows) of each batched call over `rows` frames: at most max_batch_frames per call
        (with buckets: the largest bucket within it), each padded up to its bucket."""
        step = self.max_batch_frames
        if self.batch_buckets:
            step = max([b for b in self.batch_buckets if b <= step] or [step])
        for first in range(0, rows, step):
            end = min(rows, first + step)
            yield first, end, bucket_size(end - first, self.batch_buckets)

    def _batched(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        """fn over the rows of `tensors` in chunks (self._chunks); padding rows repeat the last and are dropped."""
        outs = []
        for first, end, padded in self._chunks(len(tensors[0])):
            out = fn(*(pad_rows(t[first:end], padded) for t in tensors))
            outs.append(out[: end - first])
        return torch.cat(outs)

    # ------------------------------------------------------------------ avatars
    def prepare_avatar(self, image: np.ndarray) -> MuseTalkAvatar:
        """A portrait (H, W, 3) or an idle video (T, H, W, 3), RGB uint8 -> the prepared avatar."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ImageInputError("the avatar must be an RGB uint8 image (H, W, 3) or video frames (T, H, W, 3)")
        analyzer = self.portrait_analyzer(image[0] if image.ndim == 4 else image)
        if image.ndim == 4:
            frames = self._frame_video(image, analyzer)
        elif self.portrait_motion == "preview":
            frames = self._preview_loop(image)
        else:
            frames = self._frame_video(image[None], analyzer)
        settings = {"size": self.size, "crop": self.model.config.crop_size, "mode": self.model.config.parsing_mode,
                    "margin": self.model.config.extra_margin, "dtype": str(self.model.dtype),
                    "device": self.device.type, "cheeks": (self.model.config.left_cheek_width,
                                                           self.model.config.right_cheek_width)}
        key = content_key(frames, self.model_id, settings)
        cached = restore(self.cache_dir, key, self.device, self.model.dtype)
        if cached is not None:
            return cached
        from tqdm import tqdm

        from emo_stream.families.musetalk.avatar import prepare_frames

        with tqdm(total=len(frames), desc="preparing avatar", unit="frame", disable=len(frames) < 8,
                  leave=False) as bar:
            avatar = prepare_frames(self.model, frames, analyzer, generator=torch.Generator().manual_seed(0),
                                    progress=lambda done, total: bar.update(done - bar.n))
        avatar.key = key
        store(self.cache_dir, avatar)
        return avatar

    def _frame_video(self, frames: np.ndarray, analyzer) -> np.ndarray:
        """Every frame cut to the same square (inside the picture) around the first frame's face, resized to the
        output size: the face box takes about FACE_FRACTION of the width, a little above the centre."""
        from PIL import Image

        face = analyzer.analyze(frames[0])
        h, w = frames.shape[1:3]
        side = min(max(face.width / FACE_FRACTION, face.width * 1.2), float(min(h, w)))
        cx, cy = face.center
        x0 = float(np.clip(cx - side / 2, 0, w - side))
        y0 = float(np.clip(cy + 0.06 * side - side / 2, 0, h - side))
        box = (x0, y0, x0 + side, y0 + side)
        out = np.empty((len(frames), self.size, self.size, 3), np.uint8)
        for i, frame in enumerate(frames):
            out[i] = np.asarray(Image.fromarray(frame).resize((self.size, self.size), Image.LANCZOS, box=box))
        return out

    def _preview_loop(self, image: np.ndarray) -> np.ndarray:
        """The preview animator's idle head motion and blinks over `motion_seconds`: the moving base frames."""
        from emo_stream.registry import create_backend

        preview = create_backend("preview", size=self.size, fps=self.fps)
        avatar = preview.prepare_avatar(image)
        state = preview.new_state(avatar, seed=0)
        n = max(2, int(round(self.motion_seconds * self.fps)))
        return preview.generate([SegmentJob(avatar=avatar, state=state, features=None, num_frames=n, speech=False)])[0]

    def new_state(self, avatar: MuseTalkAvatar, seed: int = 0) -> MuseTalkState:
        return MuseTalkState(avatar=avatar, seed=int(seed))

    # ------------------------------------------------------------------ audio
    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> torch.Tensor:
        """(num_frames, 2 (left + right + 1) (layers + 1), d) prompts; audio[:start] is history and audio[0]
        sits on MuseTalk's 30 s grid of the stream (the window AudioContext.align_samples gives)."""
        return self.encode_audio_batch([(audio, start, num_frames)])[0]

    def encode_audio_batch(self, requests: list[tuple[np.ndarray, int, int]]) -> list[torch.Tensor]:
        """encode_audio for several (window, start, num_frames) at once: every 30 s segment they touch (one,
        or two across a boundary) goes through whisper in one batched call."""
        with self._audio_lock, torch.no_grad():
            return audio_mod.encode_requests(self.model.whisper, self.model.extractor, requests, self.fps,
                                             self.left, self.right)

    def _silent(self, num_frames: int) -> torch.Tensor:
        """The prompt of a frame inside silence, for every idle frame (one prompt: an idle frame depends on its
        base frame only, so it is rendered once per base frame and reused)."""
        if self._silence is None:
            spf = samples_per_frame(self.fps)
            zeros = np.zeros((2 * self.fps + self.audio_context.lookahead_frames) * spf, np.float32)
            self._silence = self.encode_audio(zeros, self.fps * spf, 1)
        return self._silence.expand(num_frames, *self._silence.shape[1:])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def denoise(self, jobs: list[SegmentJob]) -> _Denoised:
        """Every job's frames in one UNet batch (split at max_batch_frames); idle frames already rendered for
        that base frame are not computed again. Advances each session's place in its loop."""
        m = self.model
        rows_lat: list[torch.Tensor] = []
        rows_audio: list[torch.Tensor] = []
        per_job = []
        for job in jobs:
            st: MuseTalkState = job.state
            av: MuseTalkAvatar = st.avatar
            n = int(job.num_frames)
            speech = bool(job.speech and job.features is not None)
            feats = job.features if speech else self._silent(n)
            if feats.shape[0] < n:
                raise ValueError(f"features cover {feats.shape[0]} frames, the job asks for {n}")
            idx = [av.cycle_index(st.position + i) for i in range(n)]
            entries = []
            for i, k in enumerate(idx):
                if not speech and k in av.idle:
                    entries.append((k, -1, 1))
                    continue
                entries.append((k, len(rows_lat), 0 if speech else 1))
                rows_lat.append(av.latents[k])
                rows_audio.append(feats[i])
            per_job.append(entries)
            st.position += n
        if not rows_lat:
            return _Denoised(latents=None, per_job=per_job)
        lat = torch.stack(rows_lat)
        aud = torch.stack([a.to(m.device, m.dtype) for a in rows_audio])
        return _Denoised(latents=self._batched(m.denoise, lat, aud), per_job=per_job)

    def select_latents(self, result: _Denoised, indices: list[int]) -> _Denoised:
        """The rows of the jobs at `indices` (a failed decode batch is retried in halves)."""
        rows: list[int] = []
        per_job = []
        for i in indices:
            entries = []
            for k, row, idle in result.per_job[i]:
                entries.append((k, -1, idle) if row < 0 else (k, len(rows), idle))
                if row >= 0:
                    rows.append(row)
            per_job.append(entries)
        latents = result.latents[rows] if rows and result.latents is not None else None
        return _Denoised(latents=latents, per_job=per_job)

    @torch.no_grad()
    def decode(self, jobs: list[SegmentJob], result: _Denoised) -> list[np.ndarray]:
        """Batched VAE decode, then each crop pasted into its base frame on the device; one copy to the host."""
        crops = None
        if result.latents is not None:
            crops = self._batched(self.model.decode, result.latents)
        out = []
        for job, entries in zip(jobs, result.per_job):
            av: MuseTalkAvatar = job.state.avatar
            frames = []
            for k, row, idle in entries:
                if row < 0:
                    frames.append(av.idle[k])
                    continue
                frame = paste_one(av.frames[k], crops[row], av.plans[k])
                if idle:
                    av.idle[k] = frame
                frames.append(frame)
            out.append(torch.stack(frames))
        # one device -> host copy for the whole batch
        sizes = [len(f) for f in out]
        host = torch.cat(out).cpu().numpy() if out else np.empty((0, self.size, self.size, 3), np.uint8)
        return list(np.split(host, np.cumsum(sizes)[:-1])) if out else []

    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        if not jobs:
            return []
        return self.decode(jobs, self.denoise(jobs))

    def memory_profile(self, batches: tuple[int, ...] = (1, 4)):
        """Device memory of this configuration (emo_stream.blocks.memory), counted on a structure-only twin on
        the meta device: weights (UNet, VAE, whisper, the face-parsing net), per session its avatar at the
        default base-frame count (a portrait's preview loop of motion_seconds, its idle cache filled: the worst
        case) and the activation peak of one live segment (denoise + decode + paste) per batch of sessions."""
        from emo_stream.blocks.memory import profile_segments, weight_bytes
        from emo_stream.families.musetalk.loader import build_networks
        from emo_stream.families.musetalk.testing import synthetic_avatar

        m = self.model
        twin_model = m if m.device.type == "meta" else build_networks(m.config, "meta", m.dtype)
        twin = MuseTalkBackend(twin_model, size=self.size, fps=self.fps, segment_frames=self.stream_segment_frames,
                               max_batch_frames=self.max_batch_frames, cache_dir="", portrait_motion="still")
        twin.batch_buckets = self.batch_buckets
        parser = 0
        if m.parser is not None or m.device.type == "meta":   # BiSeNet sits on the device too, in float32
            from emo_stream.families.musetalk.face_parsing import BiSeNet

            with torch.device("meta"):
                parser = weight_bytes(BiSeNet(), dtype=torch.float32)
        s, c = self.size, m.config
        image = np.zeros((s, s, 3), np.uint8)   # shapes only: the twin is on meta
        base = max(2, int(round(self.motion_seconds * self.fps)))
        avatar = synthetic_avatar(twin_model, image, (s * 0.3, s * 0.3, s * 0.7, s * 0.75), frames=base, encode=False)
        avatar.idle = {k: torch.empty_like(avatar.frames[k]) for k in range(base)}   # every idle frame cached
        f = self.stream_segment_frames
        tokens = c.steps_per_frame_window * c.whisper_layers

        def jobs(n: int):
            feats = torch.zeros(f, tokens, c.pe_dim, device="meta", dtype=m.dtype)
            return twin, [SegmentJob(avatar, twin.new_state(avatar, k), feats, f) for k in range(n)]
        return profile_segments("musetalk", s, weight_bytes(twin_model) + parser, jobs,
                                lambda b, j: b.decode(j, b.denoise(j)), batches)

    # ------------------------------------------------------------------ offline
    def render_video(self, avatar: MuseTalkAvatar, audio: np.ndarray, seed: int = 0,
                     progress: Callable[[str, int, int], None] | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """MuseTalk's offline path: whisper over the whole file, then frames in chunks of clip_frames."""
        total = max(1, int(round(len(audio) * self.fps / SAMPLE_RATE)))
        with self._audio_lock, torch.no_grad():
            states = self.model.audio_states(np.asarray(audio, np.float32))
            chunks = audio_mod.frame_chunks(states, total, self.fps, self.left, self.right)
        spf = samples_per_frame(self.fps)
        padded = np.concatenate([np.asarray(audio, np.float32), np.zeros(max(0, total * spf - len(audio)), np.float32)])
        state = self.new_state(avatar, seed)
        for first in range(0, total, self.clip_frames):
            n = min(self.clip_frames, total - first)
            job = SegmentJob(avatar=avatar, state=state, features=chunks[first:first + n], num_frames=n)
            frames = self.generate([job])[0]
            if progress is not None:
                progress("generating", first + n, total)
            yield frames, padded[first * spf:(first + n) * spf]


def model_identity(folder: str | Path) -> str:
    """Cheap identity of a model folder for the avatar disk cache: its path and its weight files' sizes and times."""
    folder = Path(folder).resolve()
    parts = [str(folder)]
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".pth", ".bin", ".safetensors", ".json", ".yaml"):
            st = p.stat()
            parts.append(f"{p.relative_to(folder)}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


def create_backend(model: str | None = None, *, size: int = 512, fps: int = 25, device: str | None = None,
                   dtype: Any = None, **options: Any) -> MuseTalkBackend:
    """Registry factory: --model is MuseTalk's models/ folder as downloaded (or the checkout holding it), or our
    converted checkpoint. fp16 on CUDA by default (dtype: float32 / float16 / bfloat16)."""
    if not model:
        raise ConfigError("the musetalk backend needs --model: MuseTalk's models/ folder (see docs/musetalk.md)")
    from emo_stream.blocks.device import parse_dtype, torch_device
    from emo_stream.registry import model_family_for

    known = {"segment_frames", "clip_frames", "extra_lookahead_frames", "portrait_motion", "motion_seconds",
             "cache_dir", "max_batch_frames", "face_analyzer", "compile"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown MuseTalk backend options: {', '.join(sorted(unknown))}")
    dev = torch_device(device)
    family, found = model_family_for("musetalk", model)
    log.info("found %s", found)
    loaded = family.load_model(model, device=dev, dtype=parse_dtype(dtype, dev))
    return MuseTalkBackend(loaded, size=size, fps=fps, model_id=model_identity(model), **options)
