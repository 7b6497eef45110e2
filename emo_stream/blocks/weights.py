"""Reading weight files and loading them strictly, shared by every family's loaders.

    state = read_state_dict(path)            # .safetensors, .bin / .pth (weights_only), sharded *.index.json
    load_checked(module, state, path)        # strict, one WeightsError line naming the file, key and shape
    with empty_weights(): module = Cls(...)  # no allocation or random init: the weights are loaded right after
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from emo_stream.errors import WeightsError

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


def modernise_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
