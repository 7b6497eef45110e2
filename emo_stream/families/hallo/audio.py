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

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Model

from emo_stream.timeline import SAMPLE_RATE   # the one project-wide audio rate


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
