"""Audio features: wav2vec2 hidden states of all blocks, concatenated, at the video frame rate, with a
+-m frame window per frame; and the trainable projection from those features to audio tokens.

Timeline: audio is 16 kHz mono. wav2vec2 emits one vector per 320 samples (50 Hz) whose receptive field
is centred on sample 320 i + 200; video frame k at `fps` covers samples [k spf, (k + 1) spf). Features are
linearly interpolated from 50 Hz to the video frame centres, so any fps dividing 16000 works.
"""

from __future__ import annotations

import numpy as np
import torch

from emo_stream.timeline import SAMPLE_RATE, samples_per_frame
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

HOP = 320          # wav2vec2 samples per output vector
FIELD_CENTER = 200  # half the 400-sample receptive field of one output vector
MIN_SAMPLES = 400


class AudioEncoder(nn.Module):
    """Frozen wav2vec2 -> per-video-frame windows of all blocks' hidden states."""

    def __init__(self, wav2vec2: Wav2Vec2Model, window: int = 2):
        super().__init__()
        self.wav2vec2 = wav2vec2.eval()
        self.wav2vec2.requires_grad_(False)
        self.window = window

    @classmethod
    def from_config(cls, kwargs: dict, window: int) -> "AudioEncoder":
        return cls(Wav2Vec2Model(Wav2Vec2Config(**kwargs)), window)

    @property
    def feature_dim(self) -> int:
        c = self.wav2vec2.config
        return c.hidden_size * c.num_hidden_layers

    @torch.no_grad()
    def hidden_states(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (samples,) float -> (vectors, layers * hidden) at 50 Hz, all transformer blocks' outputs."""
        x = audio.float()
        if x.numel() < MIN_SAMPLES:
            x = torch.nn.functional.pad(x, (0, MIN_SAMPLES - x.numel()))
        # wav2vec2-base was trained on zero-mean unit-variance input (its feature extractor's do_normalize)
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        p = next(self.wav2vec2.parameters())
        out = self.wav2vec2(x[None].to(device=p.device, dtype=p.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states[1:], dim=-1)[0]

    @torch.no_grad()
    def encode(self, audio: np.ndarray | torch.Tensor, start: int, num_frames: int, fps: int) -> torch.Tensor:
        """Features for `num_frames` video frames whose first sample is audio[start].

        audio[:start] is left context; audio past the segment is look-ahead (the +-m window and wav2vec2's
        receptive field). Returns (num_frames, 2m + 1, layers * hidden), float32 on the encoder's device.
        Frames whose window reaches before the audio repeat the first available vector (edge clamping).
        """
        if num_frames < 1:
            raise ValueError("num_frames must be >= 1")
        spf = samples_per_frame(fps)
        a = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio)
        h = self.hidden_states(a)                              # (T, D)
        m = self.window
        frames = torch.arange(-m, num_frames + m, device=h.device, dtype=torch.float64)
        centres = start + (frames + 0.5) * spf
        u = ((centres - FIELD_CENTER) / HOP).clamp(0, h.shape[0] - 1)
        lo = u.floor().long()
        hi = (lo + 1).clamp(max=h.shape[0] - 1)
        w = (u - lo).to(h.dtype)[:, None]
        per_frame = h[lo] * (1 - w) + h[hi] * w                # (num_frames + 2m, D)
        win = per_frame.unfold(0, 2 * m + 1, 1)                # (num_frames, D, 2m + 1)
        return win.permute(0, 2, 1).contiguous().float()


class AudioProjection(nn.Module):
    """(batch, frames, 2m + 1, feature_dim) -> audio tokens (batch * frames, 2m + 1, token_dim)."""

    def __init__(self, feature_dim: int, token_dim: int, window: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, token_dim), nn.SiLU(), nn.Linear(token_dim, token_dim))
        self.position = nn.Parameter(torch.zeros(2 * window + 1, token_dim))
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, f, k, d = features.shape
        x = self.norm(self.net(features.to(self.position.dtype)) + self.position)
        return x.reshape(b * f, k, -1)
