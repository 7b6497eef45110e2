"""Assembling an EmoModel from the pretrained folders a user downloaded (init_weights loads each part).

Kept apart from init_weights so that module stays a leaf the model can use (no import cycle).
"""

from __future__ import annotations

import logging
from pathlib import Path

from emo_stream.errors import WeightsError
from emo_stream.families.emo.config import EmoConfig, load_config
from emo_stream.families.emo.model import EmoModel
from emo_stream.families.emo.init_weights import load_motion_adapter, load_taesd, load_unet2d, load_vae, load_wav2vec2

log = logging.getLogger(__name__)


def init_from_folders(config: EmoConfig | str, sd15: str | Path, wav2vec2: str | Path,
                      motion_adapter: str | Path | None = None, taesd: str | Path | None = None,
                      vae: str | Path | None = None):
    """Build an EmoModel from pretrained parts. Parameters not covered by any folder are newly initialised
    (random, with zero outputs where they feed pretrained layers) and logged.

    vae: an AutoencoderKL folder (e.g. sd-vae-ft-mse) used instead of the SD1.5 folder's vae/."""
    if isinstance(config, str):
        config = load_config(config)
    sd15 = Path(sd15)
    if not sd15.is_dir():
        raise WeightsError(f"SD1.5 folder not found: {sd15}")
    unet = load_unet2d(sd15, config)
    vae_model = load_vae(vae if vae else sd15, config)
    adapter = load_motion_adapter(motion_adapter, config) if motion_adapter else None
    tiny = load_taesd(taesd, config) if taesd else None
    audio = load_wav2vec2(wav2vec2, config)
    model = EmoModel.build(config, unet2d=unet, motion_adapter=adapter, audio_encoder=audio, vae=vae_model,
                           taesd=tiny)
    fresh = newly_initialised(model, adapter_loaded=adapter is not None, taesd_loaded=tiny is not None)
    for group, count in fresh.items():
        log.info("newly initialised: %s (%d parameters)", group, count)
    return model


def newly_initialised(model, adapter_loaded: bool, taesd_loaded: bool) -> dict[str, int]:
    """Parameter groups of `model` that no pretrained folder provided, with their sizes."""
    groups: dict[str, int] = {}

    def add(group: str, n: int) -> None:
        if n:
            groups[group] = groups.get(group, 0) + n

    for name, p in model.named_parameters():
        if name.startswith(("audio_proj.", "speed_encoder.", "face_locator.")):
            add(name.split(".")[0], p.numel())
        elif name.startswith("backbone.") and ".processor." in name:
            add("backbone speed-attention" if ".motion_modules." in name else "backbone audio-attention", p.numel())
        elif name.startswith("backbone.") and ".motion_modules." in name and not adapter_loaded:
            add("backbone temporal modules (no motion adapter given)", p.numel())
        elif name.startswith("taesd.") and not taesd_loaded:
            add("taesd (no TAESD folder given)", p.numel())
    return groups
