"""MuseTalk settings: the three networks' configs (as the download folder gives them) and the pipeline's
constants (crop size, v1.5's extra margin, the audio window, the blending rule), as one YAML-able dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ARCHITECTURE = "musetalk"


@dataclass
class MuseTalkConfig:
    unet: dict[str, Any] = field(default_factory=dict)       # musetalk.json (diffusers UNet2DConditionModel)
    vae: dict[str, Any] = field(default_factory=dict)        # sd-vae/config.json (diffusers AutoencoderKL)
    whisper: dict[str, Any] = field(default_factory=dict)    # whisper/config.json (transformers WhisperConfig)
    feature_extractor: dict[str, Any] = field(default_factory=dict)  # whisper/preprocessor_config.json
    version: str = "v15"
    crop_size: int = 256              # face crops are resized to this square before the VAE (MuseTalk: 256)
    extra_margin: int = 10            # v1.5: the face box reaches this many pixels further down (chin)
    audio_padding_left: int = 2       # video frames of whisper features before each frame ...
    audio_padding_right: int = 2      # ... and after it (2 whisper steps per frame at 25 fps)
    parsing_mode: str = "jaw"         # raw | neck | jaw (v1.5's default)
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    blend_expand: float = 1.5         # the pasted region: the face box's square grown by this factor
    upper_boundary_ratio: float = 0.5  # only the lower part of that square is repainted
    blur_offline: float = 0.05        # mask blur kernel, as a fraction of the pasted square (get_image)
    blur_realtime: float = 0.1        # ... of get_image_prepare_material (the live path)
    pe_dim: int = 384                 # MuseTalk's PositionalEncoding(d_model=384) on the whisper chunks
    pe_max_len: int = 5000

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    @property
    def whisper_layers(self) -> int:
        """Hidden states per whisper step that MuseTalk stacks: the embeddings + every encoder layer."""
        return int(self.whisper.get("encoder_layers", 4)) + 1

    @property
    def steps_per_frame_window(self) -> int:
        """Whisper steps (50 Hz) in one frame's audio prompt: 2 x (left + right + 1) at 25 fps."""
        return 2 * (self.audio_padding_left + self.audio_padding_right + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MuseTalkConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
