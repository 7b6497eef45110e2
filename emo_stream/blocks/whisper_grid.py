"""Whisper's 30 s grid over a live stream: what MuseTalk's and EchoMimic's live audio share.

Both run OpenAI whisper's encoder over a file cut into 30 s segments from its first sample. An encoder input is
always 3000 mel frames (1500 steps, 50 per second), so a step's states depend on where it sits in its segment
(positional embedding) and on the whole segment's audio (attention). The live path keeps that grid:

- the engine's window starts on a 30 s line of the session's audio (`live_context`: AudioContext.align_samples);
- a live call encodes each segment its frames' steps touch, with the samples received of it so far
  (`GridRequest`, `segments_touched`);
- the segments of every request in one call go through the encoder together (`encode_grid`), layer by layer
  (`encoder_states`).

What stays with each family: how a segment's mel is made (MuseTalk pads each segment's waveform to 30 s;
EchoMimic takes the log-mel of the whole file and pads each segment's log-mel) and which steps a frame reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from emo_stream.backend import AudioContext
from emo_stream.execution import to_device
from emo_stream.timeline import SAMPLE_RATE

WHISPER_HZ = 50                                              # encoder steps per second (10 ms hop, stride 2)
SEGMENT_SAMPLES = 30 * SAMPLE_RATE                           # whisper's fixed 30 s input
SEGMENT_STEPS = SEGMENT_SAMPLES * WHISPER_HZ // SAMPLE_RATE  # 1500 encoder steps per segment
SEGMENT_MEL_FRAMES = 2 * SEGMENT_STEPS                       # 3000 mel frames per segment
SAMPLES_PER_STEP = SAMPLE_RATE // WHISPER_HZ                 # 320


def live_context(left_samples: int, lookahead_frames: int) -> AudioContext:
    """The engine's windows for a family on the grid: from the 30 s line at or before `left_samples` ahead of
    a segment's first sample, to `lookahead_frames` past its last frame."""
    return AudioContext(left_samples=int(left_samples), lookahead_frames=int(lookahead_frames),
                        align_samples=SEGMENT_SAMPLES)


@torch.no_grad()
def encoder_states(encoder, mel: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
    """(segments, mels, 2 T) -> (segments, T, layers + 1, d): the embeddings and every layer's output of a
    transformers WhisperEncoder, run here layer by layer from its own modules (inputs shorter than 30 s work,
    and the result does not depend on how a transformers version collects hidden states). final_norm: the
    last layer's output after the encoder's final layer norm (MuseTalk) or before it (EchoMimic)."""
    p = encoder.conv1.weight
    x = to_device(mel, p.device, p.dtype)   # a host mel: pinned and non-blocking on CUDA
    x = torch.nn.functional.gelu(encoder.conv1(x))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    states = [x]
    for i, layer in enumerate(encoder.layers):
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        states.append(encoder.layer_norm(x) if final_norm and i == len(encoder.layers) - 1 else x)
    return torch.stack(states, dim=2)


def segments_touched(steps: list[int], width: int, num_steps: int | None = None) -> range:
    """Grid segments (counted from the window's first) that steps s .. s + width - 1 of every frame read.
    Steps before the window's first read its first segment; with num_steps, steps past the last read the
    last one (EchoMimic clips rows there, MuseTalk reads zeros)."""
    lo = max(0, min(steps))
    hi = max(steps) + width - 1
    if num_steps is not None:
        lo, hi = min(lo, num_steps - 1), min(hi, num_steps - 1)
    return range(lo // SEGMENT_STEPS, max(lo, hi) // SEGMENT_STEPS + 1)


@dataclass
class GridRequest:
    """The grid segments one live call needs: segments `first`, `first` + 1, ... of its window."""

    first: int                  # grid index (within the window) of the first segment
    segments: list[Any]         # each segment's input, as the family's encode function takes it
    steps: list[int]            # first step of each frame's read, counted from window sample 0
    width: int                  # steps per frame

    @property
    def base(self) -> int:
        """Window step of the first encoded segment's step 0."""
        return self.first * SEGMENT_STEPS


def encode_grid(requests: list[GridRequest], encode: Callable[[list[Any]], list[torch.Tensor]]
                ) -> list[torch.Tensor]:
    """Each request's segments' states joined in time order ((steps, layers + 1, d) from step `base`):
    `encode` gets the segments of every request at once (one batched encoder call) and returns their states."""
    states = encode([seg for r in requests for seg in r.segments]) if requests else []
    out, k = [], 0
    for r in requests:
        mine = states[k:k + len(r.segments)]
        out.append(torch.cat(mine) if len(mine) > 1 else mine[0])
        k += len(r.segments)
    return out
