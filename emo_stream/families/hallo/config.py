"""Hallo configuration: everything a Hallo / Hallo2 checkpoint needs to run, as one dataclass.

Defaults are Hallo's published inference setup (scripts/inference.py + configs/inference/default.yaml):
SD1.5 UNet shapes, AnimateDiff v2 motion modules (max 32 positions), 768-d audio attention, wav2vec2-base
(12 layers) features, 16-frame clips with 2 motion frames at 25 fps, DDIM 40 steps with guidance 3.5 on a
zero-SNR v-prediction schedule, face expand ratio 1.2 and pose / face / lip weights 1.0 (the script's
command-line defaults, which OmegaConf-merge over default.yaml's 1.1 values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from emo_stream.errors import ConfigError

ARCHITECTURE = "hallo"
# net.pth top-level prefix -> attribute path of HalloModel's module holding the same keys
NET_PREFIXES = {"reference_unet": "reference_unet.unet", "denoising_unet": "denoising_unet.unet",
                "face_locator": "face_locator", "imageproj": "imageproj", "audioproj": "audioproj"}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}

UNET_ADDITIONAL: dict[str, Any] = {
    "use_inflated_groupnorm": True, "unet_use_cross_frame_attention": False,
    "unet_use_temporal_attention": False, "use_motion_module": True, "use_audio_module": True,
    "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": True,
    "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
    "motion_module_kwargs": {"num_attention_heads": 8, "num_transformer_block": 1,
                             "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                             "temporal_position_encoding": True, "temporal_position_encoding_max_len": 32,
                             "temporal_attention_dim_div": 1},
    "audio_attention_dim": 768, "stack_enable_blocks_name": ["up", "down", "mid"],
    "stack_enable_blocks_depth": [0, 1, 2, 3],
}

SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear", "clip_sample": False,
    "steps_offset": 1, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}

WAV2VEC2_BASE: dict[str, Any] = {}   # empty: transformers' Wav2Vec2Config defaults ARE wav2vec2-base


@dataclass
class HalloConfig:
    variant: str = "hallo"                    # "hallo" or "hallo2" (same network; Hallo2 differs in long-video use)
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD15_UNET))
    unet_additional_kwargs: dict[str, Any] = field(default_factory=lambda: dict(UNET_ADDITIONAL))
    face_locator: dict[str, Any] = field(default_factory=lambda: {
        "conditioning_embedding_channels": 320, "conditioning_channels": 3, "block_out_channels": [16, 32, 64, 128]})
    imageproj: dict[str, Any] = field(default_factory=lambda: {
        "cross_attention_dim": 768, "clip_embeddings_dim": 512, "clip_extra_context_tokens": 4})
    audioproj: dict[str, Any] = field(default_factory=lambda: {
        "seq_len": 5, "blocks": 12, "channels": 768, "intermediate_dim": 512, "output_dim": 768,
        "context_tokens": 32})
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    wav2vec2: dict[str, Any] = field(default_factory=lambda: dict(WAV2VEC2_BASE))
    image_size: int = 512
    clip_length: int = 16
    motion_frames: int = 2
    fps: int = 25
    steps: int = 40
    guidance: float = 3.5
    face_expand_ratio: float = 1.2
    motion_scale: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])   # pose, face, lip weights
    seed: int = 42                            # inference.py: torch.manual_seed(42), one generator for all clips
    hallo2_piece_seconds: float = 60.0        # Hallo2 computes audio features per 60 s piece
    hallo2_motion_mask_rate: float = 0.25     # Hallo2: motion-frame pixels outside the face zeroed at this rate
    bank_dtype: str = "float16"               # Hallo rounds the reference bank to fp16 even in fp32 runs
    audio_window: int = 2                     # frame i sees audio frames i-2 .. i+2

    def __post_init__(self) -> None:
        if self.variant not in ("hallo", "hallo2"):
            raise ConfigError(f"hallo variant must be 'hallo' or 'hallo2', got {self.variant!r}")
        if self.clip_length < 1 or self.motion_frames < 0:
            raise ConfigError("hallo clip_length must be >= 1 and motion_frames >= 0")
        max_len = self.unet_additional_kwargs.get("motion_module_kwargs", {}).get(
            "temporal_position_encoding_max_len", 24)   # VanillaTemporalModule's default
        if self.clip_length + self.motion_frames > max_len:
            raise ConfigError(f"hallo clip_length + motion_frames = {self.clip_length + self.motion_frames} "
                              f"exceeds the motion modules' {max_len} positions")

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HalloConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"architecture"})
        if unknown:
            raise ConfigError(f"unknown hallo config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_case(cls, case: dict[str, Any]) -> "HalloConfig":
        """The configuration a golden set's case.json describes (shrunken sizes, its own clip length)."""
        dn = case.get("denoiser_single_case") or {}
        au = case.get("audio_case") or {}
        wav = dict(case.get("weights", {}).get("wav2vec2_config", {}))
        return cls(unet=dict(case["unet_2d_config"]),
                   unet_additional_kwargs=dict(case["unet_additional_kwargs"]),
                   face_locator=dict(case["module_args"]["face_locator"]),
                   imageproj=dict(case["module_args"]["imageproj"]),
                   audioproj=dict(case["module_args"]["audioproj"]),
                   scheduler=dict(case["noise_scheduler_kwargs"]),
                   wav2vec2=wav,
                   image_size=int((case.get("masks_and_face_case") or {}).get("image_hw", [512])[0]),
                   clip_length=int(dn.get("clip_length", au.get("clip_length", 16))),
                   motion_frames=int(dn.get("n_motion_frames", 2)),
                   motion_scale=[float(s) for s in dn.get("motion_scale", [1.0, 1.0, 1.0])],
                   face_expand_ratio=1.2)
