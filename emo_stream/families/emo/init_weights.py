"""Initialising EMO from pretrained folders a user downloaded (nothing is ever downloaded here).

    init_from_folders(config, sd15="models/stable-diffusion-v1-5",        # diffusers folder: unet/, vae/
                      vae="models/sd-vae-ft-mse",                         # optional, replaces sd15's vae/
                      wav2vec2="models/wav2vec2-base-960h",               # transformers folder
                      motion_adapter="models/animatediff-motion-adapter-v1-5-2",  # optional diffusers folder
                      taesd="models/taesd")                               # optional diffusers folder

State dicts are read from the folders' safetensors (or .bin, or sharded) files and loaded strictly into
modules built from our preset, so a wrong folder or a mismatched size fails with a WeightsError naming the
file, the key and both shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import AutoencoderKL, AutoencoderTiny, MotionAdapter, UNet2DConditionModel

from emo_stream.blocks.weights import empty_weights, find_weights, load_checked, modernise_vae_keys, read_state_dict
from emo_stream.errors import WeightsError
from emo_stream.families.emo.audio_encoder import AudioEncoder
from emo_stream.families.emo.config import EmoConfig

log = logging.getLogger(__name__)

def _load_component(cls, kwargs: dict, folder: str | Path, what: str, subfolder: str | None = None,
                    convert=None):
    """A diffusers model built from the preset's config, its weights read from `folder` (or its
    `subfolder`, as in an SD1.5 pipeline folder) with shapes checked key by key."""
    folder = Path(folder)
    if subfolder and (folder / subfolder).is_dir():
        folder = folder / subfolder
    path = find_weights(folder, what)
    with empty_weights():
        model = cls(**kwargs)
    state = read_state_dict(path)
    load_checked(model, convert(state) if convert else state, path, assign=True)
    return model


def load_unet2d(folder: str | Path, config: EmoConfig) -> UNet2DConditionModel:
    """SD1.5 `unet` folder (or its parent) -> UNet2DConditionModel shaped by the preset."""
    return _load_component(UNet2DConditionModel, config.unet, folder, "UNet", subfolder="unet")


def load_vae(folder: str | Path, config: EmoConfig) -> AutoencoderKL:
    return _load_component(AutoencoderKL, config.vae, folder, "VAE", subfolder="vae",
                           convert=modernise_vae_keys)


def load_motion_adapter(folder: str | Path, config: EmoConfig) -> MotionAdapter:
    return _load_component(MotionAdapter, config.motion_adapter, folder, "MotionAdapter")


def load_taesd(folder: str | Path, config: EmoConfig) -> AutoencoderTiny:
    if config.taesd is None:
        raise WeightsError("a TAESD folder was given but the model config has no taesd section")
    return _load_component(AutoencoderTiny, config.taesd, folder, "TAESD")


def load_wav2vec2(folder: str | Path, config: EmoConfig) -> AudioEncoder:
    """A transformers wav2vec2 folder (Wav2Vec2Model or Wav2Vec2ForCTC checkpoint), offline only, whose sizes
    are the preset's."""
    from emo_stream.blocks.wav2vec2 import load_wav2vec2 as load_encoder

    folder = Path(folder)
    model = load_encoder(folder)
    for key in ("hidden_size", "num_hidden_layers"):
        want = config.wav2vec2.get(key)
        got = getattr(model.config, key)
        if want is not None and want != got:
            raise WeightsError(f"{folder / 'config.json'}: {key} is {got}, the model config expects {want}")
    return AudioEncoder(model, config.audio.window)
