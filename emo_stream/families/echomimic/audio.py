"""EchoMimic v1's audio features: OpenAI whisper-tiny encoder states, per video frame.

Exactly what EchoMimic's vendored whisper computes (its Audio2Feature), with transformers' WhisperEncoder
(keys renamed from OpenAI's tiny.pt; no openai-whisper dependency):

1. log-mel of the WHOLE clip (no padding of the waveform): STFT n_fft 400 hop 160 Hann (centred), last frame
   dropped, power, 80 slaney mel filters (librosa's, computed here), log10(max(., 1e-10)), floored at max - 8,
   (x + 4) / 4;
2. cut into 3000-frame segments, each zero-padded IN THE LOG-MEL DOMAIN to 3000; per segment the encoder's
   input embedding and every block's output (the last without the final layer norm), of which the first
   (segment frames) // 2 positions are kept: (T, L + 1, 384) at 50 rows per second;
3. video frame i gets rows clip(int(i * 50 / fps) - 4 + j, 0, T - 1), j = 0..9, flattened row-major to
   (10 * (L + 1), 384) tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
SEGMENT_FRAMES = 3000      # 30 s of mel frames: whisper's fixed encoder input
ROWS_PER_SECOND = 50       # whisper feature rows per second
ROWS_PER_FRAME, ROWS_BEFORE = 10, 4   # a frame's audio tokens: feature rows int(t * 50) - 4 ... + 5


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32 slaney-normalised triangular filters over 0 .. sample_rate / 2.

    Same arithmetic as librosa.filters.mel (whisper's mel_filters.npz): float64 triangles stored into a
    float32 array, then scaled by the slaney area norm in place."""
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


def log_mel(waveform: torch.Tensor | np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """16 kHz mono float waveform (samples,) -> (n_mels, samples // 160) whisper log-mel (float32)."""
    audio = torch.as_tensor(np.asarray(waveform, dtype=np.float32) if not torch.is_tensor(waveform) else waveform,
                            dtype=torch.float32)
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT, device=audio.device), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(mel_filters(n_mels)).to(audio.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# OpenAI whisper encoder key -> transformers WhisperEncoder key (decoder keys are dropped: never run)
_WHISPER_BLOCK = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
                  "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1",
                  "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}


def whisper_key(key: str) -> str | None:
    """'encoder.blocks.3.attn.query.weight' -> 'layers.3.self_attn.q_proj.weight' (WhisperEncoder's own
    names); None for keys EchoMimic never uses (the decoder)."""
    if not key.startswith("encoder."):
        return None
    k = key[len("encoder."):]
    if k == "positional_embedding":
        return "embed_positions.weight"
    if k.startswith("ln_post."):
        return "layer_norm." + k[len("ln_post."):]
    if k.startswith("blocks."):
        _, n, rest = k.split(".", 2)
        for old, new in _WHISPER_BLOCK.items():
            if rest.startswith(old + "."):
                return f"layers.{n}.{new}.{rest[len(old) + 1:]}"
        return f"layers.{n}.{rest}"   # unknown: reported as unexpected by the strict load
    return k                          # conv1.*, conv2.*


def whisper_config(dims: dict):
    from transformers import WhisperConfig

    d = int(dims["n_audio_state"])
    return WhisperConfig(num_mel_bins=int(dims["n_mels"]), d_model=d, encoder_layers=int(dims["n_audio_layer"]),
                         encoder_attention_heads=int(dims["n_audio_head"]), encoder_ffn_dim=4 * d,
                         max_source_positions=int(dims["n_audio_ctx"]), decoder_layers=1,
                         decoder_attention_heads=1, decoder_ffn_dim=4, activation_function="gelu")


class WhisperFeatures(nn.Module):
    """transformers WhisperEncoder computing EchoMimic's per-layer whisper features."""

    def __init__(self, dims: dict):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.dims = dict(dims)
        self.encoder = WhisperEncoder(whisper_config(dims))
        self.encoder.eval().requires_grad_(False)

    @property
    def n_mels(self) -> int:
        return int(self.dims["n_mels"])

    @torch.no_grad()
    def features(self, waveform: torch.Tensor | np.ndarray) -> torch.Tensor:
        """16 kHz mono waveform -> (T, L + 1, dim) features, T = mel frames // 2 (50 per second)."""
        mel = log_mel(waveform, self.n_mels)
        return self.features_from_mel(mel)

    @torch.no_grad()
    def features_from_mel(self, mel: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        dev, dt = enc.conv1.weight.device, enc.conv1.weight.dtype
        out = []
        last: list[torch.Tensor] = []
        hook = enc.layers[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o))
        try:
            for seek in range(0, mel.shape[-1], SEGMENT_FRAMES):
                seg = mel[:, seek:seek + SEGMENT_FRAMES]
                n = seg.shape[-1]
                seg = torch.nn.functional.pad(seg, (0, SEGMENT_FRAMES - n))  # zeros in the log-mel domain
                last.clear()
                res = enc(seg[None].to(dev, dt), output_hidden_states=True, return_dict=True)
                states = list(res.hidden_states[:-1]) + [last[-1]]           # last one before the final norm
                out.append(torch.stack([s[0] for s in states], dim=1)[: n // 2])
        finally:
            hook.remove()
        return torch.cat(out).float()


def _rows(first: np.ndarray, num_rows: int, rows_per_frame: int) -> torch.Tensor:
    """(frames, rows_per_frame) indices: each frame's rows first + j, clipped to the features [0, num_rows)."""
    first = np.asarray(first, np.int64).reshape(-1)
    return torch.from_numpy(np.clip(first[:, None] + np.arange(rows_per_frame)[None], 0, num_rows - 1))


def frame_rows(num_frames: int, num_rows: int, fps: float, rows_per_frame: int = ROWS_PER_FRAME,
               rows_before: int = ROWS_BEFORE, rows_per_second: int = ROWS_PER_SECOND) -> torch.Tensor:
    """(num_frames, rows_per_frame) feature-row indices of each video frame (EchoMimic's feature2chunks:
    frame i takes rows int(i * 50 / fps) - 4 + j, clipped)."""
    first = [int(i * rows_per_second / fps) - rows_before for i in range(num_frames)]
    return _rows(np.array(first, np.int64), num_rows, rows_per_frame)


def rows_at(times_s: np.ndarray, num_rows: int, rows_per_frame: int = ROWS_PER_FRAME,
            rows_before: int = ROWS_BEFORE, rows_per_second: int = ROWS_PER_SECOND) -> torch.Tensor:
    """frame_rows for frames at given times in seconds (live: a window that starts mid-stream): the frame at
    time t takes rows int(t * 50) - 4 + j. Frames at t = i / fps from 0 get frame_rows' rows."""
    first = np.floor(np.asarray(times_s, np.float64) * rows_per_second + 1e-9).astype(np.int64) - rows_before
    return _rows(first, num_rows, rows_per_frame)


def chunk_count(num_rows: int, fps: float, rows_per_second: int = ROWS_PER_SECOND) -> int:
    """How many frames EchoMimic makes for T feature rows: i = 0, 1, ... until int(i * 50 / fps) > T, that i
    included."""
    i = 0
    while int(i * rows_per_second / fps) <= num_rows:
        i += 1
    return i + 1


def audio_tokens(features: torch.Tensor, fps: float, num_frames: int | None = None,
                 rows_per_frame: int = ROWS_PER_FRAME, rows_before: int = ROWS_BEFORE,
                 rows_per_second: int = ROWS_PER_SECOND) -> torch.Tensor:
    """(T, L + 1, dim) features -> (frames, rows_per_frame * (L + 1), dim) audio tokens per video frame.

    num_frames None: as many frames as EchoMimic makes for this audio (chunk_count)."""
    t = features.shape[0]
    n = chunk_count(t, fps, rows_per_second) if num_frames is None else num_frames
    return _gather(features, frame_rows(n, t, fps, rows_per_frame, rows_before, rows_per_second))


def tokens_at(features: torch.Tensor, times_s: np.ndarray) -> torch.Tensor:
    """audio_tokens for frames at given times in seconds (rows_at): (frames, 10 * (L + 1), dim)."""
    return _gather(features, rows_at(times_s, features.shape[0]))


def _gather(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(T, L + 1, dim) features, (frames, rows) indices -> (frames, rows * (L + 1), dim)."""
    return features[idx.to(features.device)].reshape(idx.shape[0], -1, features.shape[-1])
