"""Hallo's audio features: wav2vec2 (base-960h as downloaded) -> every layer's output at the video frame rate
-> a +-2 frame window per frame (then AudioProj makes the tokens; see modules.py).

What Hallo really computes (golden README, section 3):
- the whole clip normalised once, (x - mean) / sqrt(var + 1e-7) (Wav2Vec2FeatureExtractor, do_normalize);
- seq_len = ceil(seconds * fps); Hallo right-pads the normalised samples with zeros to a multiple of the
  clip length (Hallo2 only on its last 60 s piece);
- conv feature encoder (50 Hz) -> linear interpolation (align_corners=True) to seq_len BEFORE the feature
  projection and the transformer -> outputs of every transformer layer (not the input embedding);
- frame i sees rows clip(i + j, 0, seq_len - 1) for j in -2..2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from emo_stream.errors import WeightsError
from emo_stream.timeline import SAMPLE_RATE   # the one project-wide audio rate


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


def normalize(samples: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's do_normalize over the whole clip (float32)."""
    x = np.asarray(samples, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def frame_count(n_samples: int, fps: int) -> int:
    return math.ceil(n_samples / SAMPLE_RATE * fps)


def pad_to_clips(normed: np.ndarray, fps: int, clip_length: int) -> tuple[np.ndarray, int]:
    """Hallo's padding: zeros so that the frame count is a multiple of clip_length -> (samples, frames)."""
    seq_len = frame_count(len(normed), fps)
    if seq_len % clip_length:
        extra = clip_length - seq_len % clip_length
        normed = np.concatenate([normed, np.zeros(extra * (SAMPLE_RATE // fps), dtype=normed.dtype)])
        seq_len += extra
    return normed, seq_len


@torch.no_grad()
def layer_features(model: Wav2Vec2Model, normed: np.ndarray | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Normalised samples -> (seq_len, layers, hidden): every transformer layer's output at the frame rate."""
    x = torch.as_tensor(np.asarray(normed, dtype=np.float32))[None]
    p = next(model.parameters())
    x = x.to(p.device, p.dtype)
    feats = model.feature_extractor(x).transpose(1, 2)                       # (1, T50, C)
    feats = F.interpolate(feats.transpose(1, 2), size=seq_len, mode="linear", align_corners=True).transpose(1, 2)
    hidden, _ = model.feature_projection(feats)
    enc = model.encoder
    hidden = hidden + enc.pos_conv_embed(hidden)
    hidden = enc.layer_norm(hidden)
    outs = []
    for layer in enc.layers:
        hidden = layer(hidden, attention_mask=None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        outs.append(hidden)
    return torch.stack(outs, dim=2)[0]                                          # (seq_len, L, C)


def windows(features: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(seq_len, L, C) -> (seq_len, 2 radius + 1, L, C); indices clamped at both ends."""
    n = features.shape[0]
    idx = torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)[None]
    return features[idx.clamp(0, n - 1)]
