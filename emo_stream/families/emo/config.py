"""EMO model configuration: YAML presets (configs/models/*.yaml) -> a validated dataclass.

The diffusers/transformers parts keep their own constructor kwargs as plain dicts (they are rebuilt with
UNet2DConditionModel(**unet), MotionAdapter(**motion_adapter), ...); the parts that are ours are dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_stream.config_io import build_dataclass, read_yaml
from emo_stream.errors import ConfigError
from emo_stream.resources import resource_dir

PRESETS_DIR = resource_dir("configs") / "models"
PRESETS = ("tiny", "sd15", "sd15_live")


@dataclass
class AudioConfig:
    window: int = 2                    # m: each frame sees the features of frames [k - m, k + m]
    token_dim: int = 768               # width of the audio tokens (audio-attention keys/values)
    left_context_seconds: float = 0.8  # streaming: history given to wav2vec2 in front of a segment


@dataclass
class SpeedConfig:
    centers: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    radii: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    hidden_dim: int = 512
    token_dim: int = 768
    default: float = 1.0               # head-rotation speed (degrees/frame) asked for at inference


@dataclass
class FaceLocatorConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])


@dataclass
class SamplingConfig:
    steps: int = 40
    idle_steps: int = 8                # silence renders with fewer steps
    guidance: float = 3.5              # classifier-free guidance on the audio (1 = off)
    decoder: str = "vae"               # "vae" (SD VAE) or "taesd" (AutoencoderTiny)
    scheduler: str = "ddim"            # "ddim" or "lcm"


@dataclass
class NoiseConfig:
    """The noise schedule the model was trained with; training and sampling both build their diffusers
    schedulers from it (defaults: SD1.5's scaled-linear betas, epsilon prediction)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"   # "linear", "scaled_linear", "squaredcos_cap_v2"
    prediction_type: str = "epsilon"       # "epsilon" or "v_prediction"
    rescale_betas_zero_snr: bool = False   # zero terminal SNR (needs v_prediction to be useful)
    timestep_spacing: str = "trailing"     # how inference timesteps are spread: "leading", "trailing", "linspace"
    steps_offset: int = 1

    def scheduler_kwargs(self) -> dict[str, Any]:
        """kwargs for diffusers DDIMScheduler / LCMScheduler / DDPMScheduler."""
        return dict(dataclasses.asdict(self), clip_sample=False, set_alpha_to_one=False)

    def ddpm_kwargs(self) -> dict[str, Any]:
        """kwargs for the training DDPMScheduler: the schedule itself (inference spacing/offset do not apply)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("timestep_spacing", "steps_offset")}


@dataclass
class EmoConfig:
    architecture: str = "emo"          # model family key (emo_stream.registry); always "emo" here
    name: str = "custom"
    clip_frames: int = 12
    motion_frames: int = 4
    unet: dict[str, Any] = field(default_factory=dict)
    motion_adapter: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    taesd: dict[str, Any] | None = None
    wav2vec2: dict[str, Any] = field(default_factory=dict)
    audio: AudioConfig = field(default_factory=AudioConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    face_locator: FaceLocatorConfig = field(default_factory=FaceLocatorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # what classifier-free guidance's unconditional branch drops (EMO: the audio tokens only)
    uncond_drops: list[str] = field(default_factory=lambda: ["audio"])

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell (8 for SD's VAE)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be a multiple of this (latent factor x backbone downsampling)."""
        return self.latent_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)

    @property
    def audio_feature_dim(self) -> int:
        """wav2vec2 hidden states of all blocks, concatenated."""
        return int(self.wav2vec2.get("hidden_size", 768)) * int(self.wav2vec2.get("num_hidden_layers", 12))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "EmoConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model config {self.name!r}: {msg}")

        need(self.architecture == "emo", f"architecture is {self.architecture!r}; this config class holds "
                                          f"EMO models only (see emo_stream.registry)")
        need(self.clip_frames >= 1, f"clip_frames must be >= 1 (got {self.clip_frames})")
        need(self.motion_frames >= 1, f"motion_frames must be >= 1 (got {self.motion_frames})")
        for part in ("unet", "motion_adapter", "vae", "wav2vec2"):
            need(isinstance(getattr(self, part), dict) and getattr(self, part), f"section {part!r} is missing")
        unet_ch = list(self.unet.get("block_out_channels", []))
        need(len(unet_ch) >= 1, "unet.block_out_channels is missing")
        need(len(self.unet.get("down_block_types", [])) == len(unet_ch) == len(self.unet.get("up_block_types", [])),
             "unet block types and block_out_channels must have the same length")
        need(any("CrossAttn" in t for t in self.unet["down_block_types"]),
             "unet needs at least one CrossAttn block (reference- and audio-attention live there)")
        need(list(self.motion_adapter.get("block_out_channels", [])) == unet_ch,
             f"motion_adapter.block_out_channels {self.motion_adapter.get('block_out_channels')} "
             f"must equal unet.block_out_channels {unet_ch}")
        lpb = self.unet.get("layers_per_block", 2)
        need(self.motion_adapter.get("motion_layers_per_block", 2) == lpb,
             "motion_adapter.motion_layers_per_block must equal unet.layers_per_block")
        max_seq = self.motion_adapter.get("motion_max_seq_length", 32)
        need(self.clip_frames + self.motion_frames <= max_seq,
             f"clip_frames + motion_frames ({self.clip_frames + self.motion_frames}) exceeds the temporal "
             f"modules' motion_max_seq_length ({max_seq})")
        need(self.unet.get("in_channels", 4) == self.latent_channels == self.unet.get("out_channels", 4),
             "unet in/out channels must equal vae.latent_channels")
        need(len(self.speed.centers) == len(self.speed.radii) and self.speed.centers,
             "speed.centers and speed.radii must be non-empty and of equal length")
        need(all(r > 0 for r in self.speed.radii), "speed.radii must be positive")
        need(len(self.face_locator.channels) == int(math.log2(self.latent_factor)) + 1,
             f"face_locator.channels needs {int(math.log2(self.latent_factor)) + 1} entries "
             f"(one stride-2 conv per VAE level), got {len(self.face_locator.channels)}")
        need(self.audio.window >= 0, "audio.window must be >= 0")
        need(self.sampling.steps >= 1 and self.sampling.idle_steps >= 1, "sampling steps must be >= 1")
        need(self.sampling.decoder in ("vae", "taesd"), "sampling.decoder must be vae or taesd")
        need(self.sampling.decoder != "taesd" or self.taesd is not None, "decoder taesd needs a taesd section")
        need(self.sampling.scheduler in ("ddim", "lcm"), "sampling.scheduler must be ddim or lcm")
        need(self.noise.prediction_type in ("epsilon", "v_prediction"), "noise.prediction_type must be epsilon "
                                                                         "or v_prediction")
        need(self.noise.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
             "noise.beta_schedule must be linear, scaled_linear or squaredcos_cap_v2")
        need(self.noise.timestep_spacing in ("leading", "trailing", "linspace"),
             "noise.timestep_spacing must be leading, trailing or linspace")
        need(self.noise.num_train_timesteps >= 2, "noise.num_train_timesteps must be >= 2")
        need(self.uncond_drops == ["audio"], "uncond_drops must be [audio] (EMO's guidance drops the audio only)")
        return self


def config_from_dict(data: dict[str, Any], source: str = "config") -> EmoConfig:
    """Build and validate an EmoConfig from a plain dict (YAML/JSON). Unknown keys are an error."""
    return build_dataclass(EmoConfig, data, source).validate()


def load_config(name_or_path: str | Path) -> EmoConfig:
    """A preset name ("tiny", "sd15") or a YAML file path -> validated EmoConfig. Raises ConfigError."""
    path = PRESETS_DIR / f"{name_or_path}.yaml" if str(name_or_path) in PRESETS else Path(name_or_path)
    data = read_yaml(path, "model config", hint=f" (use a preset: {', '.join(PRESETS)}, or a YAML file)")
    return config_from_dict(data, source=str(path))
