"""wav2vec2 (a transformers folder as downloaded, e.g. facebook/wav2vec2-base-960h) for every family that
uses it (EMO's audio encoder, Hallo's audio features): strict, offline, weights_only, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from emo_stream.errors import WeightsError


def load_wav2vec2(folder: str | Path) -> Wav2Vec2Model:
    """A Wav2Vec2Model (eval, fp32) from a transformers folder as downloaded (config.json + model.safetensors
    or pytorch_model.bin; Wav2Vec2ForCTC keys `wav2vec2.*`, weight-normed pos conv as weight_g / weight_v)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: no config.json (expected the wav2vec2-base-960h folder as downloaded)")
    try:
        config = Wav2Vec2Config(**json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{cfg_path}: not a wav2vec2 config ({exc})") from None
    state = _read_state(folder)
    model = Wav2Vec2Model(config)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("lm_head.") or key.startswith("quantizer.") or key.startswith("project_"):
            continue   # CTC / pre-training heads: not part of the encoder
        key = key.removeprefix("wav2vec2.")
        key = _weight_norm_name(key, own)
        mapped[key] = value
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise WeightsError(f"{folder}: wav2vec2 weights do not match its config.json ({what}; "
                           f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightsError(f"{folder}: wav2vec2 tensor {key} has shape {tuple(value.shape)}, "
                               f"config.json needs {tuple(own[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    return model.eval()


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{st}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None
    bin_ = folder / "pytorch_model.bin"
    if bin_.is_file():
        try:
            return torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"{bin_}: unreadable ({str(exc).splitlines()[0]})") from None
    raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _weight_norm_name(key: str, own: dict[str, torch.Tensor]) -> str:
    """Published weight-norm names (weight_g / weight_v) -> torch's parametrization names when ours use them."""
    for old, new in ((".weight_g", ".parametrizations.weight.original0"),
                     (".weight_v", ".parametrizations.weight.original1")):
        if key.endswith(old) and key not in own:
            alt = key[: -len(old)] + new
            if alt in own:
                return alt
    return key
