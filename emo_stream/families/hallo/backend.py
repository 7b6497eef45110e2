"""HalloBackend: Hallo / Hallo2 weights behind the backend contract (emo_stream.backend).

    backend = create_backend(model="pretrained_models")     # a Hallo or Hallo2 download as it comes
    for frames, audio in backend.render_video(avatar, audio16k, seed=42): ...        # offline
    frames = backend.generate([SegmentJob(avatar, state, backend.encode_audio(w, start, n), n)])  # live

Offline reproduces scripts/inference.py (Hallo) / inference_long.py (Hallo2) around the exact model:
- portrait: our dlib detector and crop (Hallo: insightface + mediapipe on a square photo); face / lip boxes
  from the 68 points, Hallo's masks at every level, the ArcFace embedding from the download's insightface
  ONNX (onnxruntime; zeros with a warning without it);
- audio: the whole clip normalised once, wav2vec2 features at 25 fps padded to whole 16-frame clips
  (Hallo2: per 60 s piece, padding only the last), +-2 frame windows, audio projection per clip;
- clips of 16 frames chained through motion frames: the last 2 decoded frames (float pixels, not the
  8-bit video) re-encoded by the VAE with the reference; one generator seeded once for all clips; 40 DDIM
  steps, guidance 3.5; frames written as uint8(clip(x * 255)) like Hallo's writer;
- Hallo2 only: motion-frame pixels outside the face are zeroed at random (rate 0.25) before encoding.
Not done: vocal separation (Kim_Vocal_2.onnx; Hallo runs it before wav2vec2): pass clean speech.

Live: segments continue each other exactly like clips do (motion frames = the previous segment's last two
decoded frames); wav2vec2 sees `left_context_s` of audio before a segment and 3 frames after it (the +-2
window, +1 for the interpolation edge), normalised over that window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from emo_stream.backend import AudioContext, BackendBase, SegmentJob
from emo_stream.blocks.checks import check_crop, check_fps, check_size
from emo_stream.errors import ConfigError
from emo_stream.execution import to_device
from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

log = logging.getLogger(__name__)

LOOKAHEAD_FRAMES = 3


@dataclass
class HalloAvatar:
    image: np.ndarray                 # (size, size, 3) uint8 crop
    pixels: torch.Tensor              # (1, 3, size, size) in [-1, 1]
    face_mask: torch.Tensor           # (size, size) in {0, 1}: Hallo2's motion-frame mask region
    masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    face_tokens: torch.Tensor         # (1, 4, d)
    uncond_face_tokens: torch.Tensor  # (1, 4, d)
    face_feature: torch.Tensor        # (1, C, 1, h, w)


@dataclass
class HalloState:
    avatar: HalloAvatar
    generator: torch.Generator       # one for all clips, like Hallo's torch.manual_seed(42) (also Hallo2's masks)
    motion_pixels: torch.Tensor | None = None   # (n_motion, 3, H, W) float in [-1, 1], oldest first
    frames_done: int = 0


class HalloBackend(BackendBase):
    name = "hallo"

    def __init__(self, model, size: int = 512, fps: int = 25, steps: int | None = None,
                 guidance: float | None = None, decoder: str | None = None, segment_frames: int | None = None,
                 left_context_s: float = 2.0, face_analyzer=None):
        cfg = model.config
        check_size(size, 64, "Hallo")
        if fps != cfg.fps:
            log.warning("Hallo was trained at %d fps; rendering at %d fps", cfg.fps, fps)
        spf = check_fps(fps)
        if decoder not in (None, "vae"):
            raise ConfigError(f"Hallo decodes with its VAE only (got --decoder {decoder})")
        if model.vae is None:
            raise ConfigError("the Hallo model has no VAE: the download's sd-vae-ft-mse folder is missing")
        self.model = model
        self.size, self.fps = size, fps
        self.steps = int(cfg.steps if steps is None else steps)   # --steps 0 is an error, not the default
        self.guidance = float(cfg.guidance if guidance is None else guidance)
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")
        self.clip_frames = cfg.clip_length
        self.stream_segment_frames = int(segment_frames or cfg.clip_length)
        if not 1 <= self.stream_segment_frames <= cfg.clip_length:
            raise ConfigError(f"segment_frames must be 1..{cfg.clip_length}")
        p = next(model.denoising_unet.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._face_analyzer = face_analyzer
        self.audio_context = AudioContext(left_samples=int(round(left_context_s * fps)) * spf,
                                          lookahead_frames=LOOKAHEAD_FRAMES)
        self._silence: dict[int, torch.Tensor] = {}

    # ---- avatar ------------------------------------------------------------------------------------
    def prepare_avatar(self, image: np.ndarray) -> HalloAvatar:
        from emo_stream.face import prepare_portrait

        crop = prepare_portrait(image, self.size, self.portrait_analyzer(image))
        from emo_stream.families.hallo.identity import face_embedding
        emb = face_embedding(crop.image, crop.face.landmarks, self.model.face_models)
        return self.avatar_from_crop(crop.image, crop.face.landmarks, emb)

    @torch.no_grad()
    def avatar_from_crop(self, image: np.ndarray, landmarks68: np.ndarray,
                         embedding: np.ndarray | None = None) -> HalloAvatar:
        """A (size, size, 3) crop, its dlib 68 points and its 512-d face embedding -> HalloAvatar."""
        from emo_stream.families.hallo.masks import boxes_from_dlib68, region_masks

        check_crop(image, self.size)
        m, dev, dt = self.model, self.device, self.dtype
        face_box, lip_box = boxes_from_dlib68(landmarks68)
        rm = region_masks(face_box, lip_box, self.size, self.size, face_expand_ratio=m.config.face_expand_ratio)
        n_levels = len(m.config.unet["block_out_channels"])
        masks = [tuple(x.to(dev, dt) for x in lv) for lv in rm.levels((self.size, self.size), n_levels)]
        emb = torch.zeros(1, 512) if embedding is None else torch.as_tensor(np.asarray(embedding)).reshape(1, -1)
        cond, uncond = m.face_tokens(emb.to(dev, dt))
        pixels = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1
        region = rm.face_region()           # on the host: the motion-frame mask stays there, no read-back
        return HalloAvatar(image=image, pixels=pixels, face_mask=region[0].float(), masks=masks,
                           face_tokens=cond, uncond_face_tokens=uncond,
                           face_feature=m.face_feature(region.to(dev, dt), 1))

    def new_state(self, avatar: HalloAvatar, seed: int = 0) -> HalloState:
        return HalloState(avatar=avatar, generator=torch.Generator().manual_seed(int(seed)))

    # ---- audio -------------------------------------------------------------------------------------
    def _features(self, normed: np.ndarray, frames: int) -> torch.Tensor:
        from emo_stream.families.hallo.audio import layer_features
        return layer_features(self.model.wav2vec2, normed, frames)

    def encode_audio(self, audio: np.ndarray, start: int, num_frames: int) -> torch.Tensor:
        """Live: (num_frames, 5, layers, dim) windows; audio[:start] is left context (whole frames)."""
        from emo_stream.families.hallo.audio import normalize, windows
        spf = samples_per_frame(self.fps)
        left = start // spf
        total = left + num_frames + LOOKAHEAD_FRAMES
        x = np.zeros(total * spf, np.float32)
        a = np.asarray(audio, np.float32)[start - left * spf:][: total * spf]
        x[: len(a)] = a
        feats = self._features(normalize(x), total)
        return windows(feats, self.model.config.audio_window)[left:left + num_frames]

    # ---- one clip ----------------------------------------------------------------------------------
    def _clip(self, state: HalloState, wins: torch.Tensor) -> torch.Tensor:
        """Windows (f, 5, L, D) -> decoded frames (f, 3, H, W) in [0, 1]; updates the motion frames."""
        from emo_stream.families.hallo.model import ClipInputs
        m, av, cfg = self.model, state.avatar, self.model.config
        f = wins.shape[0]
        nm = cfg.motion_frames
        motion = state.motion_pixels if state.motion_pixels is not None else av.pixels.repeat(nm, 1, 1, 1)
        if cfg.variant == "hallo2" and state.motion_pixels is not None and cfg.hallo2_motion_mask_rate > 0:
            keep = (torch.rand(motion.shape[-2:], generator=state.generator) > cfg.hallo2_motion_mask_rate)
            keep = keep.float().clamp(min=av.face_mask)   # inside the face nothing is dropped
            motion = motion * keep
        ref_latents = m.encode_images(to_device(torch.cat([av.pixels, motion]), self.device, self.dtype))
        clip = ClipInputs(ref_latents=ref_latents, face_tokens=av.face_tokens,
                          uncond_face_tokens=av.uncond_face_tokens,
                          audio_tokens=m.audio_tokens(wins.to(self.device, self.dtype)), masks=av.masks,
                          face_feature=av.face_feature.repeat(1, 1, f, 1, 1))
        h = self.size // 8
        noise = to_device(torch.randn((1, 4, f, h, h), generator=state.generator, dtype=self.dtype), self.device)
        latents = m.sample_clip(noise * m.scheduler.init_noise_sigma, clip, steps=self.steps, guidance=self.guidance)
        pixels = m.decode_latents(latents[0].transpose(0, 1)).float().cpu()        # (f, 3, H, W) in [0, 1]
        keep = torch.cat([state.motion_pixels, pixels * 2 - 1]) if state.motion_pixels is not None and f < nm \
            else pixels * 2 - 1
        state.motion_pixels = keep[-nm:].clone()
        state.frames_done += f
        return pixels

    @staticmethod
    def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
        """Hallo's writer: uint8(clip(x * 255)) (truncation)."""
        return np.clip(pixels.permute(0, 2, 3, 1).numpy() * 255, 0, 255).astype(np.uint8)

    # ---- offline -----------------------------------------------------------------------------------
    @torch.no_grad()
    def render_video(self, avatar: HalloAvatar, audio: np.ndarray, seed: int | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from emo_stream.families.hallo.audio import frame_count
        cfg = self.model.config
        audio = np.asarray(audio, np.float32)
        n_frames = frame_count(len(audio), self.fps)
        wins = self._offline_windows(audio)
        state = self.new_state(avatar, cfg.seed if seed is None else seed)
        spf = samples_per_frame(self.fps)
        padded = np.concatenate([audio, np.zeros(max(0, n_frames * spf - len(audio)), np.float32)])
        n_clips = wins.shape[0] // cfg.clip_length
        done = 0
        for c in range(n_clips):
            pixels = self._clip(state, wins[c * cfg.clip_length:(c + 1) * cfg.clip_length])
            if progress is not None:
                progress("clips", c + 1, n_clips)
            take = min(len(pixels), n_frames - done)
            if take <= 0:
                break
            yield self._to_uint8(pixels[:take]), padded[done * spf:(done + take) * spf]
            done += take

    def _offline_windows(self, audio: np.ndarray) -> torch.Tensor:
        """Hallo: the whole clip at once; Hallo2: 60 s pieces (each normalised, only the last padded)."""
        from emo_stream.families.hallo.audio import frame_count, normalize, pad_to_clips, windows
        cfg = self.model.config
        if cfg.variant != "hallo2":
            padded, seq_len = pad_to_clips(normalize(audio), self.fps, cfg.clip_length)
            return windows(self._features(padded, seq_len), cfg.audio_window)
        piece = int(cfg.hallo2_piece_seconds * SAMPLE_RATE)
        feats = []
        for lo in range(0, len(audio), piece):
            part = normalize(audio[lo:lo + piece])
            last = lo + piece >= len(audio)
            if last:
                part, seq_len = pad_to_clips(part, self.fps, cfg.clip_length)
            else:
                seq_len = frame_count(len(part), self.fps)
            feats.append(self._features(part, seq_len))
        return windows(torch.cat(feats), cfg.audio_window)

    # ---- live --------------------------------------------------------------------------------------
    def _silent(self, num_frames: int) -> torch.Tensor:
        if num_frames not in self._silence:
            spf = samples_per_frame(self.fps)
            left = self.audio_context.left_samples
            zeros = np.zeros(left + (num_frames + LOOKAHEAD_FRAMES) * spf, np.float32)
            self._silence[num_frames] = self.encode_audio(zeros, left, num_frames)
        return self._silence[num_frames]

    @torch.no_grad()
    def generate(self, jobs: list[SegmentJob]) -> list[np.ndarray]:
        out = []
        for job in jobs:     # Hallo's batch is one clip; sessions run one after another
            if job.num_frames < 1 or job.num_frames > self.clip_frames:
                raise ValueError(f"num_frames must be 1..{self.clip_frames} for Hallo")
            wins = job.features if (job.speech and job.features is not None) else self._silent(job.num_frames)
            if wins.shape[0] != job.num_frames:
                raise ValueError(f"features cover {wins.shape[0]} frames, the job asks for {job.num_frames}")
            out.append(self._to_uint8(self._clip(job.state, wins)))
        return out

    def memory_profile(self, batches: tuple[int, ...] = (1, 4)):
        """Device memory of this configuration (emo_stream.blocks.memory), counted on a structure-only twin on
        the meta device: weights (wav2vec2 included: it sits beside the model; a twin without it counts
        wav2vec2-base's 95 M parameters), one session's avatar and state, and one continuing segment's peak
        (a guided clip: denoise + SD VAE decode). Hallo runs a batch's sessions one after another, so every
        batch has one session's activation peak."""
        from emo_stream.blocks.memory import profile_segments, weight_bytes

        m = self.model
        if self.device.type == "meta":
            twin = self
        else:
            from accelerate import init_empty_weights
            from diffusers import AutoencoderKL

            from emo_stream.families.hallo.model import HalloModel

            with init_empty_weights(include_buffers=False):
                twin_model = HalloModel(m.config, None, vae=AutoencoderKL.from_config(m.vae.config))
            twin = HalloBackend(twin_model.eval().to("meta", self.dtype), size=self.size, fps=self.fps, steps=1,
                                guidance=self.guidance, segment_frames=self.stream_segment_frames)
        s, cfg = self.size, m.config
        rng = np.random.default_rng(0)   # landmarks of a frontal face in the crop (only the masks' shapes matter)
        lm = np.concatenate([rng.uniform([30, 40], [98, 110], (48, 2)),
                             rng.uniform([52, 86], [76, 98], (20, 2))]) * (s / 128)
        avatar = twin.avatar_from_crop(np.zeros((s, s, 3), np.uint8), lm, np.zeros(512, np.float32))
        ap, f = cfg.audioproj, twin.stream_segment_frames

        def jobs(n: int):
            wins = torch.zeros(f, ap["seq_len"], ap["blocks"], ap["channels"], device="meta", dtype=self.dtype)
            return twin, [SegmentJob(avatar, twin.new_state(avatar, k), wins, f) for k in range(n)]
        weights = weight_bytes(m, dtype=self.dtype)
        if m.wav2vec2 is None:
            weights += 95_000_000 * torch.finfo(self.dtype).bits // 8
        return profile_segments("hallo", s, weights, jobs, lambda b, j: b.generate(j), batches, batched=False)


def create_backend(model: str | None = None, *, size: int = 512, fps: int = 25, device: str | None = None,
                   dtype: Any = None, **options: Any) -> HalloBackend:
    """Registry factory (emo_stream.registry): --model is a Hallo / Hallo2 download or our checkpoint of one."""
    if not model:
        raise ConfigError("the hallo backend needs --model: the fudan-generative-ai/hallo (or hallo2) "
                          "download folder (see docs/model.md)")
    from emo_stream.blocks.device import parse_dtype, torch_device
    from emo_stream.registry import model_family_for

    dev = torch_device(device)
    known = {"steps", "guidance", "decoder", "segment_frames", "left_context_s", "face_analyzer"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown Hallo backend options: {', '.join(sorted(unknown))}")
    family, found = model_family_for("hallo", model)
    log.info("found %s", found)
    loaded = family.load_model(model, device=dev, dtype=parse_dtype(dtype, dev))
    return HalloBackend(loaded, size=size, fps=fps, **options)
