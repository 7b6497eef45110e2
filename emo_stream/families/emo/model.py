"""EmoModel: every part of EMO in one container, with save_pretrained / from_pretrained.

Parts (attribute names are also the checkpoint key prefixes):
    reference_net   ReferenceNet (SD1.5 UNet2DConditionModel + write processors)
    backbone        Backbone (UNetMotionModel = SD1.5 2D weights + AnimateDiff temporal modules, EMO processors)
    audio_encoder   AudioEncoder (frozen wav2vec2; all blocks' hidden states per video frame, +-m window)
    audio_proj      AudioProjection (features -> audio tokens)
    speed_encoder   SpeedEncoder (head-speed buckets -> tokens for the temporal modules)
    face_locator    FaceLocator (face-region mask -> latent offset)
    vae             AutoencoderKL (SD VAE);  taesd: AutoencoderTiny or None (fast decoder)

Training entry point: `EmoModel.forward(...)` (see its docstring). Inference code (emo_stream.families.emo.backend)
uses the same pieces split by how often they run: encode_reference (once per avatar), encode_motion (once
per clip), condition (once per clip), predict_noise (once per sampling step).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, MotionAdapter, UNet2DConditionModel
from torch import nn

from emo_stream.errors import WeightsError
from emo_stream.execution import to_device
from emo_stream.blocks.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint
from emo_stream.blocks.checkpoint import load_checkpoint as load_checkpoint_folder
from emo_stream.families.emo.attention import BackboneContext, cat_kv, zero_module
from emo_stream.families.emo.audio_encoder import AudioEncoder, AudioProjection
from emo_stream.families.emo.backbone import Backbone
from emo_stream.families.emo.config import EmoConfig, config_from_dict, load_config
from emo_stream.families.emo.face_locator import FaceLocator
from emo_stream.families.emo.reference_net import ReferenceFeatures, ReferenceNet
from emo_stream.families.emo.speed import SpeedEncoder

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Everything a denoising step needs besides the noisy latent and the timestep (batch first)."""

    context: BackboneContext     # reference tokens, motion-frame features, speed tokens
    audio_tokens: torch.Tensor   # (batch * frames, 2m + 1, token_dim)
    face: torch.Tensor           # (batch, latent_channels, h, w), added to the noisy latent

    def with_null_audio(self) -> "Conditioning":
        """The unconditional branch of classifier-free guidance: same everything, audio tokens zeroed."""
        ctx = BackboneContext(**{**self.context.__dict__,
                                 "kv_cache": {} if self.context.kv_cache is not None else None})
        return Conditioning(ctx, torch.zeros_like(self.audio_tokens), self.face)

    def padded(self, batch: int) -> "Conditioning":
        """The same conditioning with `batch` samples, the last one repeated (batch buckets: a compiled
        denoiser sees a few batch sizes; the extra samples' outputs are dropped)."""
        c = self.context
        extra = batch - c.batch
        if extra <= 0:
            return self
        rep = lambda t: torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])  # noqa: E731
        frames = self.audio_tokens.shape[0] // c.batch
        ctx = BackboneContext(
            batch=batch, reference={k: rep(v) for k, v in c.reference.items()} if c.reference else None,
            motion={k: rep(v) for k, v in c.motion.items()} if c.motion else None,
            speed=rep(c.speed) if c.speed is not None else None,
            reference_kv={k: (rep(a), rep(v)) for k, (a, v) in c.reference_kv.items()} if c.reference_kv else None,
            kv_cache={} if c.kv_cache is not None else None, speed_uniform=c.speed_uniform)
        audio = torch.cat([self.audio_tokens, self.audio_tokens[-frames:].repeat(extra, 1, 1)])
        return Conditioning(ctx, audio, rep(self.face))

    @staticmethod
    def cat(a: "Conditioning", b: "Conditioning") -> "Conditioning":
        ca, cb = a.context, b.context
        kv = cat_kv([ca.reference_kv, cb.reference_kv]) if ca.reference_kv and cb.reference_kv else None
        ctx = BackboneContext(
            batch=ca.batch + cb.batch,
            reference={k: torch.cat([v, cb.reference[k]]) for k, v in ca.reference.items()} if ca.reference else None,
            motion={k: torch.cat([v, cb.motion[k]]) for k, v in ca.motion.items()} if ca.motion else None,
            speed=torch.cat([ca.speed, cb.speed]) if ca.speed is not None else None,
            reference_kv=kv, kv_cache={} if ca.kv_cache is not None and cb.kv_cache is not None else None,
            speed_uniform=ca.speed_uniform and cb.speed_uniform)
        return Conditioning(ctx, torch.cat([a.audio_tokens, b.audio_tokens]), torch.cat([a.face, b.face]))


def zero_temporal_outputs(unet_or_adapter: nn.Module) -> None:
    """Fresh temporal modules should not change the 2D model: zero their output projections (AnimateDiff)."""
    for name, module in unet_or_adapter.named_modules():
        if name.endswith("proj_out") and ".motion_modules." in f".{name}":
            zero_module(module)


class EmoModel(nn.Module):
    def __init__(self, config: EmoConfig, reference_net: ReferenceNet, backbone: Backbone,
                 audio_encoder: AudioEncoder, vae: AutoencoderKL, taesd: AutoencoderTiny | None = None):
        super().__init__()
        self.config = config
        self.reference_net = reference_net
        self.backbone = backbone
        self.audio_encoder = audio_encoder
        self.audio_proj = AudioProjection(config.audio_feature_dim, config.audio.token_dim, config.audio.window)
        self.speed_encoder = SpeedEncoder(config.speed.centers, config.speed.radii, config.speed.hidden_dim,
                                          config.speed.token_dim, config.audio.window)
        self.face_locator = FaceLocator(config.face_locator.channels, config.latent_channels)
        self.vae = vae.eval().requires_grad_(False)
        self.taesd = taesd.eval().requires_grad_(False) if taesd is not None else None

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, config: EmoConfig | str, unet2d: UNet2DConditionModel | None = None,
              motion_adapter: MotionAdapter | None = None, audio_encoder: AudioEncoder | None = None,
              vae: AutoencoderKL | None = None, taesd: AutoencoderTiny | None = None,
              empty: bool = False) -> "EmoModel":
        """Assemble a model; every part not given is built from the config with random weights.

        The ReferenceNet and the backbone's 2D part both start from `unet2d` (as in EMO, from SD1.5).
        A fresh (random) motion adapter gets zero output projections, so it starts as a no-op.
        empty=True: structure only, parameters on the meta device (from_pretrained loads them).
        """
        if isinstance(config, str):
            config = load_config(config)
        if empty:
            from emo_stream.blocks.weights import empty_weights

            with empty_weights():
                return cls._build(config, None, None, None, None, None, load_weights=False)
        return cls._build(config, unet2d, motion_adapter, audio_encoder, vae, taesd, load_weights=True)

    @classmethod
    def _build(cls, config: EmoConfig, unet2d, motion_adapter, audio_encoder, vae, taesd,
               load_weights: bool) -> "EmoModel":
        unet2d = unet2d if unet2d is not None else UNet2DConditionModel(**config.unet)
        if motion_adapter is None:
            motion_adapter = MotionAdapter(**config.motion_adapter)
            zero_temporal_outputs(motion_adapter)
        reference_net = ReferenceNet(copy.deepcopy(unet2d))
        backbone = Backbone.from_unet2d(unet2d, motion_adapter, config.audio.token_dim, config.speed.token_dim,
                                        load_weights=load_weights)
        audio_encoder = audio_encoder or AudioEncoder.from_config(config.wav2vec2, config.audio.window)
        vae = vae if vae is not None else AutoencoderKL(**config.vae)
        if taesd is None and config.taesd is not None:
            taesd = AutoencoderTiny(**config.taesd)
        return cls(config, reference_net, backbone, audio_encoder, vae, taesd)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    # ---- inference pieces ------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) in [-1, 1] -> scaled latents (batch, 4, H/8, W/8) (the distribution mean)."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode() * self.vae_scale

    def decode_latents(self, latents: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        """(batch, 4, h, w) scaled latents -> (batch, 3, H, W) in [-1, 1]."""
        if decoder == "taesd":
            if self.taesd is None:
                raise WeightsError("decoder 'taesd' asked for, but this model has no TAESD decoder")
            return self.taesd.decode(latents.to(self.taesd.dtype)).sample
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae_scale).sample

    def encode_reference(self, reference_latents: torch.Tensor, project: bool = False) -> ReferenceFeatures:
        """ReferenceNet at t=0 on the reference latent(s) (batch, 4, h, w): the avatar's cached features.

        project=True also computes the tokens' key/value projections of the backbone's reference-attention
        (constant per avatar; inference caches them with the features)."""
        features = self.reference_net(reference_latents)
        if project:
            features.kv = self.backbone.reference_kv(features.tokens)
        return features

    def encode_motion(self, motion_latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Motion-frame latents (batch, 4, n, h, w) -> site -> (batch, n, C, h', w') for the temporal modules."""
        b, c, n, h, w = motion_latents.shape
        flat = motion_latents.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w)
        sites = self.reference_net(flat, tokens=False).sites
        return {k: v.reshape(b, n, *v.shape[1:]) for k, v in sites.items()}

    def motion_from_reference(self, reference: ReferenceFeatures) -> dict[str, torch.Tensor]:
        """Motion features when there are no previous frames yet: the reference, repeated n times."""
        n = self.config.motion_frames
        return {k: v[:, None].expand(-1, n, *v.shape[1:]) for k, v in reference.sites.items()}

    def condition(self, reference: ReferenceFeatures, audio_features: torch.Tensor, face_mask: torch.Tensor,
                  speed: torch.Tensor | None = None, motion: dict[str, torch.Tensor] | None = None,
                  cache: bool = False) -> Conditioning:
        """Per-clip conditioning.

        reference       ReferenceFeatures, batch B (one row per sample)
        audio_features  (B, F, 2m + 1, feature_dim) from AudioEncoder.encode
        face_mask       (B, 1, H, W) pixel-resolution face-region mask in {0, 1}
        speed           (B, F) or (B, n + F) head speed per frame (degrees/frame); None: config default
        motion          site -> (B, n, C, h, w) motion-frame features (encode_motion / motion_from_reference);
                        None: no motion frames (the temporal modules then see only the clip)
        cache           inference: reuse the reference's precomputed key/values (reference.kv) and compute
                        the audio and speed key/values once for all the segment's denoising steps
        """
        b, f = audio_features.shape[:2]
        dev, dt = self.device, self.dtype
        n = next(iter(motion.values())).shape[1] if motion else 0
        if speed is None:
            uniform = True
            speed = torch.full((b, f), self.config.speed.default, device=dev)
        else:
            # equal speeds in a row give equal tokens; decided on the host's copy only: reading a device tensor
            # back would wait for the GPU once per segment (a device speed gets the plain, equally exact path)
            uniform = speed.device.type == "cpu" and bool((speed == speed[:, :1]).all())
        speed = to_device(speed, dev).float()
        if speed.shape[1] == f and n:
            speed = torch.cat([speed[:, :1].expand(-1, n), speed], dim=1)
        if speed.shape != (b, n + f):
            raise ValueError(f"speed must be (batch, frames) or (batch, n + frames); got {tuple(speed.shape)}")
        speed_tokens = self.speed_encoder(speed).to(dt)
        ctx = BackboneContext(batch=b, reference={k: v.to(dev, dt) for k, v in reference.tokens.items()},
                              motion={k: v.to(dev, dt) for k, v in motion.items()} if motion else None,
                              speed=speed_tokens,
                              # a constant head speed gives equal tokens: the speed attention is one vector
                              speed_uniform=self.backbone.options.uniform_speed and uniform)
        if cache:
            if reference.kv is not None:
                ctx.reference_kv = {k: (a.to(dev, dt), v.to(dev, dt)) for k, (a, v) in reference.kv.items()}
            ctx.kv_cache = {}
        tokens = self.audio_proj(audio_features.to(dev)).to(dt)
        face = self.face_locator(face_mask.to(dev))
        return Conditioning(ctx, tokens, face.to(dt))

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """noisy_latents (B, 4, F, h, w), timesteps (B,) or scalar -> predicted noise (B, 4, F, h, w)."""
        x = noisy_latents.to(self.dtype) + cond.face[:, :, None]
        return self.backbone(x, timesteps, cond.audio_tokens, cond.context)

    def set_shortcuts(self, on: bool) -> None:
        """Switch the exact inference shortcuts (attention.py, backbone.py) on or off. Off computes everything
        the plain way (same outputs to ~1e-6; tests and bench/flops.py compare the two). Reference and
        audio/speed K/V caching are asked for per call instead (encode_reference(project=), condition(cache=))."""
        from emo_stream.families.emo.attention import SingleTokenCrossAttnProcessor

        self.backbone.options.prune_motion = self.backbone.options.uniform_speed = bool(on)
        for proc in self.reference_net.unet.attn_processors.values():
            if isinstance(proc, SingleTokenCrossAttnProcessor):
                proc.enabled = bool(on)

    # ---- training ------------------------------------------------------------------------------
    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, reference_latents: torch.Tensor,
                audio_features: torch.Tensor, face_mask: torch.Tensor, speed: torch.Tensor | None = None,
                motion_latents: torch.Tensor | None = None, drop_audio: torch.Tensor | None = None) -> torch.Tensor:
        """Training forward: noise prediction for a batch of noisy clips (epsilon objective, like SD1.5).

        noisy_latents     (B, 4, F, h, w)  scheduler.add_noise(clean clip latents, noise, timesteps); the clip
                          latents are `encode_image(frames) ` (already multiplied by the VAE scaling factor)
        timesteps         (B,) long
        reference_latents (B, 4, h, w)     encode_image(reference frame)
        audio_features    (B, F, 2m + 1, feature_dim)  AudioEncoder.encode per clip (precompute them)
        face_mask         (B, 1, H, W)     union of the clip's face boxes (emo_stream.face.face_region_mask)
        speed             (B, F) or (B, n + F) head-rotation speed in degrees/frame, or None (config default)
        motion_latents    (B, 4, n, h, w)  latents of the n frames before the clip, or None (stage 1 / images)
        drop_audio        (B,) bool: zero those samples' audio tokens (trains the guidance's null branch)
        Returns the predicted noise, (B, 4, F, h, w). Every part runs with autograd; `set_trainable(groups)`
        chooses what trains. Works with gradient checkpointing (see Backbone.forward).
        """
        reference = self.reference_net(reference_latents)
        motion = self.encode_motion(motion_latents) if motion_latents is not None else None
        cond = self.condition(reference, audio_features, face_mask, speed, motion)
        if drop_audio is not None:
            f = audio_features.shape[1]
            keep = (~drop_audio.to(cond.audio_tokens.device)).repeat_interleave(f).to(cond.audio_tokens.dtype)
            cond.audio_tokens = cond.audio_tokens * keep[:, None, None]
        return self.predict_noise(noisy_latents, timesteps, cond)

    # What trains is chosen by parameter group; training configs name them (`train.trainable`, and the
    # stages' defaults in emo_stream.training.config.STAGE_TRAINABLE). Everything else (wav2vec2, VAE,
    # TAESD) is "frozen" and never trains.
    PARAMETER_GROUPS = ("referencenet", "backbone", "temporal", "audio", "speed", "face_locator")

    @staticmethod
    def parameter_group(name: str) -> str:
        """The group of a parameter (a `named_parameters()` name): one of PARAMETER_GROUPS, or "frozen".

        referencenet  the ReferenceNet UNet
        backbone      the backbone's 2D (spatial) part: resnets, spatial attention, conv in/out
        temporal      the AnimateDiff temporal modules (without the speed cross-attention)
        audio         audio projection + the backbone's audio cross-attention
        speed         speed encoder + the temporal modules' speed cross-attention
        face_locator  the face-region mask encoder
        """
        if name.startswith("reference_net."):
            return "referencenet"
        if name.startswith("face_locator."):
            return "face_locator"
        if name.startswith("audio_proj."):
            return "audio"
        if name.startswith("speed_encoder."):
            return "speed"
        if name.startswith("backbone."):
            temporal = ".motion_modules." in name
            if ".processor." in name:  # EMO's new cross-attentions live in the attention processors
                return "speed" if temporal else "audio"
            return "temporal" if temporal else "backbone"
        return "frozen"

    def set_trainable(self, groups: Iterable[str]) -> dict[str, nn.Parameter]:
        """requires_grad on exactly the parameters of `groups` (PARAMETER_GROUPS), off on every other one;
        returns the trainable parameters by name."""
        groups = set(groups)
        unknown = sorted(groups - set(self.PARAMETER_GROUPS))
        if unknown:
            raise ValueError(f"unknown parameter groups {unknown}; known: {', '.join(self.PARAMETER_GROUPS)}")
        chosen = {}
        for name, p in self.named_parameters():
            on = self.parameter_group(name) in groups
            p.requires_grad_(on)
            if on:
                chosen[name] = p
        return chosen

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.yaml + model.safetensors (every part, VAE and wav2vec2 included)."""
        return save_checkpoint(self, self.config.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "EmoModel":
        """Load a checkpoint written by save_pretrained. Raises WeightsError naming the file/key/shape."""
        return load_checkpoint_folder(directory, lambda data, source: config_from_dict(data, source=source),
                               lambda config: cls.build(config, empty=True), device, dtype)

    def parameter_counts(self) -> dict[str, int]:
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in self.named_children() if m is not None}
        in_backbone: dict[str, int] = {}
        for name, p in self.backbone.named_parameters():
            group = self.parameter_group(f"backbone.{name}")
            in_backbone[group] = in_backbone.get(group, 0) + p.numel()
        counts["backbone_temporal"] = in_backbone.get("temporal", 0)
        counts["backbone_audio_attention"] = in_backbone.get("audio", 0)
        counts["backbone_speed_attention"] = in_backbone.get("speed", 0)
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


def load_emo_checkpoint(path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> EmoModel:
    """The "emo" family's loader (emo_stream.registry)."""
    return EmoModel.from_pretrained(path, device=device, dtype=dtype)


__all__ = ["EmoModel", "load_emo_checkpoint", "Conditioning", "CONFIG_FILE", "WEIGHTS_FILE"]
