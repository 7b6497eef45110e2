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

import json
import logging
from pathlib import Path
from typing import Mapping

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, MotionAdapter, UNet2DConditionModel
from torch import nn

from emo_stream.errors import WeightsError
from emo_stream.models.audio_encoder import AudioEncoder
from emo_stream.models.config import EmoConfig

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors, .bin or sharded (*.index.json) weights file -> state dict (CPU)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(read_state_dict(path.parent / shard))
            return state
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    # clone: tensors viewed out of the file buffer can be misaligned, which makes CPU
                    # kernels take other code paths (outputs differing in the last bits)
                    out[key] = f.get_tensor(key).clone()
            return out
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # corrupt/truncated files: name the file, keep one line
        raise WeightsError(f"cannot read weights file {path}: {unreadable_reason(exc)}") from None


def unreadable_reason(exc: Exception) -> str:
    """Why torch/safetensors could not read a file, in a few words (their own messages run to paragraphs)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    cut_short = isinstance(exc, OSError) and exc.errno == 22   # torch's zip reader seeking past the end
    if cut_short or "central directory" in first or isinstance(exc, EOFError) or "incomplete metadata" in first:
        return "truncated or corrupt (incomplete download? fetch the file again)"
    if "Unsupported global" in text:   # a real pickle naming classes/functions: refused, never run
        return ("it holds pickled Python objects besides tensors; refused (weights are read with "
                "torch.load(weights_only=True), never as code)")
    if type(exc).__name__ in ("UnpicklingError", "KeyError"):   # bytes that are no pickle at all
        return "not a torch weights file (neither a torch zip archive nor a tensor pickle)"
    # unknown: the library's first sentence, bounded
    sentence = first.split(". ")[0]
    return f"{type(exc).__name__}: {sentence[:200]}"


def find_weights(folder: Path, what: str) -> Path:
    """The weights file of a diffusers model folder (single file or sharded)."""
    if not folder.is_dir():
        raise WeightsError(f"{what} folder not found: {folder}")
    for name in DIFFUSERS_WEIGHTS + tuple(n + ".index.json" for n in DIFFUSERS_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{what} folder {folder} has no weights file (expected {DIFFUSERS_WEIGHTS[0]}); "
                       f"is this the right folder?")


def empty_weights():
    """Build modules without allocating or initialising parameters (they are loaded right after).

    Buffers stay real: diffusers/ours compute some non-persistent ones (positional tables) at construction.
    """
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path,
                 ignore_unexpected: tuple[str, ...] = (), assign: bool = False) -> None:
    """Strict load with one-line errors: the first missing key, unexpected key or shape mismatch, by name.

    assign=True takes the file's tensors as the parameters (for modules built under empty_weights()).
    """
    own = module.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise WeightsError(f"{source}: shape mismatch for {key}: file has {tuple(value.shape)}, "
                               f"model expects {tuple(own[key].shape)} (weights for a different model size?)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore_unexpected)]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} weights missing, e.g. {missing[0]} "
                           f"{tuple(own[missing[0]].shape)} (wrong folder or model type?)")
    if unexpected:
        raise WeightsError(f"{source}: {len(unexpected)} unexpected weights, e.g. {unexpected[0]} "
                           f"{tuple(state[unexpected[0]].shape)} (wrong folder or model type?)")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True, assign=assign)
    if assign:
        left = next((n for n, p in module.named_parameters() if p.is_meta), None)
        if left is not None:
            raise WeightsError(f"{source}: no weights for {left}")


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modernise_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers VAE folders name the mid-block attention query/key/value/proj_attn."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_VAE_ATTENTION:
            key = ".".join(parts[:-2] + [_OLD_VAE_ATTENTION[parts[-2]], parts[-1]])
            if value.ndim == 4:  # 1x1 conv weights of very old checkpoints
                value = value[:, :, 0, 0]
        out[key] = value
    return out


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
                           convert=_modernise_vae_keys)


def load_motion_adapter(folder: str | Path, config: EmoConfig) -> MotionAdapter:
    return _load_component(MotionAdapter, config.motion_adapter, folder, "MotionAdapter")


def load_taesd(folder: str | Path, config: EmoConfig) -> AutoencoderTiny:
    if config.taesd is None:
        raise WeightsError("a TAESD folder was given but the model config has no taesd section")
    return _load_component(AutoencoderTiny, config.taesd, folder, "TAESD")


def load_wav2vec2(folder: str | Path, config: EmoConfig) -> AudioEncoder:
    """A transformers wav2vec2 folder (Wav2Vec2Model or Wav2Vec2ForCTC checkpoint), offline only."""
    from transformers import Wav2Vec2Model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"wav2vec2 folder {folder} has no config.json: expected a transformers model folder")
    try:
        model = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load wav2vec2 from {folder}: {str(exc).splitlines()[0]}") from None
    for key in ("hidden_size", "num_hidden_layers"):
        want = config.wav2vec2.get(key)
        got = getattr(model.config, key)
        if want is not None and want != got:
            raise WeightsError(f"{folder / 'config.json'}: {key} is {got}, the model config expects {want}")
    return AudioEncoder(model, config.audio.window)
