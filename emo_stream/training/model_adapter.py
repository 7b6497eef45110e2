"""What training needs from the EMO model (emo_stream.families.emo), in one place: loading and saving,
the diffusion loss of a batch, gradient checkpointing, sample videos.

Parameter groups (names used by configs' `train.trainable` and config.STAGE_TRAINABLE) are the model's:
EmoModel.PARAMETER_GROUPS, EmoModel.parameter_group(name), model.set_trainable(groups).
The VAE, TAESD and wav2vec2 are never trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emo_stream.errors import ConfigError
from emo_stream.families.emo.model import EmoModel
from emo_stream.timeline import samples_per_frame
from emo_stream.training.dataset_layout import FPS

log = logging.getLogger(__name__)

PARAM_GROUPS = EmoModel.PARAMETER_GROUPS  # config.py validates `train.trainable` against these


def load_model(init: str, options: dict[str, Any] | None = None):
    """A preset (random weights), a checkpoint folder, or an init YAML naming pretrained folders."""
    from emo_stream.families.emo.backend import load_model as _load

    options = dict(options or {})
    seed = int(options.pop("seed", 0))
    if options:
        raise ConfigError(f"unknown model.options: {', '.join(sorted(options))} (known: seed)")
    return _load(init, seed=seed)


def save_model(model, directory: Path, training: dict[str, Any] | None = None) -> Path:
    """model.save_pretrained + training.json (how it was trained)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    if training is not None:
        (directory / "training.json").write_text(json.dumps(training, indent=2, default=str))
    return directory


def enable_gradient_checkpointing(model) -> None:
    model.reference_net.unet.enable_gradient_checkpointing()
    model.backbone.unet.enable_gradient_checkpointing()


def audio_context_frames(model) -> tuple[int, int]:
    """(left, right) frames of audio around a clip the encoder gets, as the streaming backend gives it."""
    cfg = model.config.audio
    return int(round(cfg.left_context_seconds * FPS)), int(cfg.window)


def model_size_multiple(model) -> int:
    return int(model.config.size_multiple)


def audio_feature_fn(model_spec: str):
    """(audio 16 kHz, num_frames) -> (num_frames, 2m + 1, D) float16 features, for prepare's cache."""
    model = load_model(model_spec)
    left, right = audio_context_frames(model)
    spf = samples_per_frame(FPS)

    def encode(audio: np.ndarray, num_frames: int) -> np.ndarray:
        padded = np.concatenate([np.zeros(left * spf, np.float32), audio, np.zeros(right * spf, np.float32)])
        feats = model.audio_encoder.encode(padded, left * spf, num_frames, FPS)
        return feats.cpu().numpy().astype(np.float16)

    return encode


class TrainingModule(nn.Module):
    """EmoModel + its noise schedule -> the loss of one batch. Wrapped by accelerate (DDP) as a whole,
    so every trainable parameter is reached through this module's forward."""

    def __init__(self, model, stage: int, motion_noise: float = 0.0):
        super().__init__()
        self.motion_noise = motion_noise
        from diffusers import DDPMScheduler

        self.model = model
        self.stage = stage
        noise = model.config.noise   # the checkpoint's own schedule (EmoConfig.noise)
        self.prediction_type = noise.prediction_type
        self.noise_schedule = DDPMScheduler(**noise.ddpm_kwargs())
        self.register_buffer("alphas_cumprod", self.noise_schedule.alphas_cumprod.clone().float(), persistent=False)

    def train(self, mode: bool = True) -> "TrainingModule":
        super().train(mode)
        # frozen encoders stay in eval mode (wav2vec2 has dropout)
        for part in (self.model.vae, self.model.audio_encoder, self.model.taesd):
            if part is not None:
                part.eval()
        return self

    @torch.no_grad()
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) -> (..., 4, h, w) scaled VAE latents, the frozen VAE run in chunks."""
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        lat = torch.cat([self.model.encode_image(c) for c in flat.split(16)])
        return lat.reshape(*lead, *lat.shape[1:]).float()

    @torch.no_grad()
    def _audio_features(self, batch: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
        m = self.model
        if "audio_features" in batch:
            return batch["audio_features"].float()
        if "audio" not in batch:  # stage 1: images, no audio; the audio layers see zero tokens
            k = 2 * m.config.audio.window + 1
            b = batch["target"].shape[0]
            return torch.zeros(b, frames, k, m.config.audio_feature_dim, device=batch["target"].device)
        left, _ = audio_context_frames(m)
        spf = samples_per_frame(FPS)
        return torch.stack([m.audio_encoder.encode(a, left * spf, frames, FPS) for a in batch["audio"]])

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator, cond_drop: float = 0.0
                ) -> torch.Tensor:
        m = self.model
        if self.stage == 1:
            clean = self._latents(batch["target"])[:, :, None]               # (B, 4, 1, h, w)
            motion = None
        else:
            clean = self._latents(batch["frames"]).permute(0, 2, 1, 3, 4)   # (B, 4, F, h, w)
            motion = self._latents(batch["motion"]).permute(0, 2, 1, 3, 4)  # (B, 4, n, h, w)
        b, frames = clean.shape[0], clean.shape[2]
        reference = self._latents(batch["reference"])
        feats = self._audio_features(batch, frames)
        # all randomness comes from `generator` (a function of seed and step): exact resume
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator).to(clean.device)
        drop = (torch.rand(b, generator=generator) < cond_drop).to(clean.device)
        if motion is not None and self.motion_noise:
            motion = motion + self.motion_noise * torch.randn(motion.shape, generator=generator).to(motion.device)
        if self.stage == 1:
            drop = torch.ones_like(drop)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1, 1)
        noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
        speed = batch.get("speed") if self.stage != 1 else None
        pred = m(noisy, t, reference, feats, batch["mask"], speed, motion, drop_audio=drop)
        if self.prediction_type == "v_prediction":   # v = sqrt(a) * noise - sqrt(1 - a) * x0
            return torch.nn.functional.mse_loss(pred.float(), a.sqrt() * noise - (1 - a).sqrt() * clean)
        return torch.nn.functional.mse_loss(pred.float(), noise)


def model_size(model, dataset_size: int | None = None) -> int:
    """The training resolution: the dataset's, checked against the model's size multiple."""
    if dataset_size is None:
        raise ConfigError("dataset size unknown")
    mult = model_size_multiple(model)
    if dataset_size % mult:
        raise ConfigError(f"dataset size {dataset_size} is not a multiple of {mult} (model {model.config.name!r}); "
                          f"set data.size to a multiple or prepare at another --size")
    return dataset_size


def render_sample(model, image: np.ndarray, audio: np.ndarray, out: Path, size: int, steps: int | None = None,
                  face_box: np.ndarray | None = None, seed: int = 0) -> Path:
    """A sample video with the EMO backend. `image` at the model size with a known `face_box` skips face
    detection (synthetic faces); otherwise the portrait is detected and cropped as in generate."""
    from emo_stream.families.emo.backend import EmoBackend
    from emo_stream.generate import iter_segments
    from emo_stream.media import Mp4Writer

    backend = EmoBackend(model, size=size, fps=25, steps=steps)
    if face_box is not None and image.shape[:2] == (size, size):
        avatar = backend.avatar_from_crop(image, face_box)
    else:
        avatar = backend.prepare_avatar(image)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(out, fps=25, size=size) as w:
        for frames, chunk in iter_segments(backend, avatar, audio, seed=seed):
            w.write_frames(frames)
            w.write_audio(chunk)
    return out
