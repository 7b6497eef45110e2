"""EchoMimic v1 configuration: everything a checkpoint needs to run, saved in its config.yaml.

The diffusers/transformers parts keep their constructor kwargs as plain dicts:
    reference_unet  UNet2DConditionModel kwargs (the ReferenceNet; built without attn2/norm2 and without the
                    output head, which EchoMimic's reference_unet.pth does not have)
    denoiser        UNetMotionModel kwargs (SD1.5 2D weights + AnimateDiff temporal modules)
    whisper         OpenAI whisper `dims` (n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer)
    vae             AutoencoderKL kwargs, or None when the checkpoint carries no VAE
The rest are the facts of EchoMimic's code that differ from our EMO model (see models/echomimic/__init__.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from emo_stream.config_io import build_dataclass
from emo_stream.errors import ConfigError

ARCHITECTURE = "echomimic-v1"

# EchoMimic's configs/inference/inference_v2.yaml noise_scheduler_kwargs (diffusers DDIMScheduler kwargs)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                 clip_sample=False, steps_offset=1, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 timestep_spacing="trailing")

SD15_CHANNELS = [320, 640, 1280, 1280]


def sd15_reference_unet(channels: list[int] | None = None, layers_per_block: int = 2, heads: int = 8,
                        groups: int = 32) -> dict[str, Any]:
    return dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=list(channels or SD15_CHANNELS),
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                layers_per_block=layers_per_block, attention_head_dim=heads, norm_num_groups=groups,
                cross_attention_dim=768)


def sd15_denoiser(channels: list[int] | None = None, layers_per_block: int = 2, heads: int = 8, groups: int = 32,
                  audio_dim: int = 384, motion_heads: int = 8, motion_max_len: int = 32) -> dict[str, Any]:
    return dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=list(channels or SD15_CHANNELS),
                down_block_types=["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"],
                up_block_types=["UpBlockMotion"] + ["CrossAttnUpBlockMotion"] * 3,
                layers_per_block=layers_per_block, num_attention_heads=heads, norm_num_groups=groups,
                cross_attention_dim=audio_dim, motion_num_attention_heads=motion_heads,
                motion_max_seq_length=motion_max_len, use_motion_mid_block=True)


WHISPER_TINY = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4)


@dataclass
class FaceLocatorConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    out_channels: int = 320            # = denoiser block_out_channels[0]: added right after conv_in
    conditioning_channels: int = 1


@dataclass
class AudioFeatureConfig:
    """How whisper features become per-frame audio tokens (EchoMimic's Audio2Feature.feature2chunks)."""

    rows_per_frame: int = 10           # feature rows per video frame (at 50 rows/s)
    rows_before: int = 4               # frame i uses rows int(i*50/fps) - 4 ... + 5
    features_per_second: int = 50
    feature_ratio: float = 3.0         # the audio cross-attention output is multiplied by this


@dataclass
class SamplingDefaults:
    steps: int = 6                     # acc weights: 6 DDIM steps, no guidance; normal: 30 steps, guidance 2.5
    guidance: float = 1.0
    context_frames: int = 12
    context_overlap: int = 3


@dataclass
class EchoMimicConfig:
    architecture: str = ARCHITECTURE
    name: str = "echomimic-v1"
    weights_set: str = "acc"           # "acc" (6-step distilled) or "normal"
    fps: int = 24
    reference_unet: dict[str, Any] = field(default_factory=sd15_reference_unet)
    denoiser: dict[str, Any] = field(default_factory=sd15_denoiser)
    face_locator: FaceLocatorConfig = field(default_factory=FaceLocatorConfig)
    whisper: dict[str, Any] = field(default_factory=lambda: dict(WHISPER_TINY))
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    vae: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # AnimateDiff's temporal modules normalise with 32 groups whatever the UNet's norm_num_groups
    motion_norm_groups: int = 32
    # EchoMimic's ReferenceAttentionControl.update() casts the reference bank to this dtype even in fp32 runs
    bank_dtype: str = "float16"
    # what the unconditional branch of guidance drops (all three together, as EchoMimic's pipelines do)
    uncond_drops: list[str] = field(default_factory=lambda: ["audio", "face", "reference"])

    @property
    def audio_tokens_per_frame(self) -> int:
        return self.audio.rows_per_frame * (int(self.whisper["n_audio_layer"]) + 1)

    @property
    def audio_dim(self) -> int:
        return int(self.whisper["n_audio_state"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "EchoMimicConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"EchoMimic config {self.name!r}: {msg}")

        need(self.architecture == ARCHITECTURE, f"architecture must be {ARCHITECTURE!r}")
        need(self.weights_set in ("acc", "normal"), "weights_set must be acc or normal")
        need(self.fps >= 1, "fps must be >= 1")
        need(self.bank_dtype in ("float16", "float32", "bfloat16"), "bank_dtype must be float16/float32/bfloat16")
        need(sorted(self.uncond_drops) == ["audio", "face", "reference"],
             "uncond_drops must be [audio, face, reference] (EchoMimic drops all three together)")
        ch = list(self.denoiser.get("block_out_channels", []))
        need(ch and ch == list(self.reference_unet.get("block_out_channels", [])),
             "reference_unet and denoiser must have the same block_out_channels")
        need(self.face_locator.out_channels == ch[0],
             f"face_locator.out_channels ({self.face_locator.out_channels}) must equal the denoiser's first "
             f"block channels ({ch[0]})")
        need(int(self.denoiser.get("cross_attention_dim", 0)) == self.audio_dim,
             "denoiser.cross_attention_dim must equal whisper n_audio_state (audio tokens go to attn2 unprojected)")
        need(self.sampling.steps >= 1, "sampling.steps must be >= 1")
        need(0 <= self.sampling.context_overlap < self.sampling.context_frames, "need 0 <= context_overlap < "
                                                                                "context_frames")
        return self


def config_from_dict(data: dict[str, Any], source: str = "config") -> EchoMimicConfig:
    return build_dataclass(EchoMimicConfig, data, source).validate()
