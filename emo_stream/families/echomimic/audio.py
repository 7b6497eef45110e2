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

Live (`encode_live`, below): the same 30 s grid over a stream (emo_stream.blocks.whisper_grid). A live frame's
tokens are EchoMimic's whole-file tokens of the session's audio up to the end of its window, exactly while the
loudest log-mel value so far lies in the window (the current 30 s segment and the one before it: always in a
stream's first minute). What differs from the whole file is stated there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch import nn

from emo_stream.backend import AudioContext
from emo_stream.blocks import whisper_grid as grid
from emo_stream.execution import to_device

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
SEGMENT_FRAMES = grid.SEGMENT_MEL_FRAMES   # 30 s of mel frames: whisper's fixed encoder input
ROWS_PER_SECOND = grid.WHISPER_HZ          # whisper feature rows per second
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


@lru_cache(maxsize=8)
def _filters_on(n_mels: int, device: str) -> torch.Tensor:
    """mel_filters as a tensor on `device`, made once (a host->device copy per call would wait for the device)."""
    return to_device(torch.from_numpy(mel_filters(n_mels)), torch.device(device))


def log_mel(waveform: torch.Tensor | np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """16 kHz mono float waveform (samples,) -> (n_mels, samples // 160) whisper log-mel (float32), computed
    where the waveform is. The floor is the clip's own maximum - 8 (log10 units)."""
    audio = torch.as_tensor(np.asarray(waveform, dtype=np.float32) if not torch.is_tensor(waveform) else waveform,
                            dtype=torch.float32)
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT, device=audio.device), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = _filters_on(n_mels, str(audio.device)) @ power
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
        """(mels, frames) whole-file log-mel -> (frames // 2, L + 1, dim): each 3000-frame segment zero-padded
        in the log-mel domain and encoded on its own, its first (segment frames) // 2 rows kept."""
        out = []
        for seek in range(0, mel.shape[-1], SEGMENT_FRAMES):
            seg = mel[:, seek:seek + SEGMENT_FRAMES]
            n = seg.shape[-1]
            out.append(self.segment_states(pad_segment(seg)[None])[0, : n // 2])
        return torch.cat(out).float()

    @torch.no_grad()
    def segment_states(self, mel: torch.Tensor) -> torch.Tensor:
        """(segments, mels, 3000) -> (segments, 1500, L + 1, dim): the embeddings and every block's output, the
        last one before the final layer norm (what EchoMimic's whisper returns), segments in one batch."""
        return grid.encoder_states(self.encoder, mel, final_norm=False)


def pad_segment(seg: torch.Tensor) -> torch.Tensor:
    """(mels, n <= 3000) -> (mels, 3000): zeros appended in the log-mel domain, as EchoMimic's whisper pads."""
    return torch.nn.functional.pad(seg, (0, SEGMENT_FRAMES - seg.shape[-1]))


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
    return features[to_device(idx, features.device)].reshape(idx.shape[0], -1, features.shape[-1])


# ---- live: the stream on whisper's 30 s grid (emo_stream.blocks.whisper_grid) ---------------------------------
# EchoMimic takes the log-mel of the whole file, floored at the file's maximum - 8, and encodes it in 30 s
# segments from the file's first sample. A live window starts on the grid line BEFORE the one of the segment's
# first token row (left context: one whole segment), so its log-mel holds the file's STFT frames at every line its
# rows touch (the window's own first STFT frames reflect-pad its edge) and a floor over the last 30-60 s; each grid segment the frames' rows touch is encoded with the frames received so far,
# zero-padded in the log-mel domain as EchoMimic pads a file's last segment. A frame's tokens then equal
# EchoMimic's whole-file tokens of the audio up to the window's end, where the loudest log-mel value so far lies
# in the window (always in a stream's first minute). What differs from EchoMimic's pass over the complete file:
#   - the rest of the frame's 30 s segment, not received yet (the encoder attends over the whole segment);
#   - the floor: max - 8 over the window, not over the whole file (louder audio later raises it; past a minute,
#     louder audio earlier than the window is forgotten): it moves only log-mel values below that floor
#     (digital silence, very quiet passages);
#   - at an utterance's end, the rows past it: the engine's zero-padded look-ahead, not the file's last row.
# 30 s, plus a frame's reach before its first sample (4 rows and the part of a row before it): a segment whose
# first rows lie before a grid line still gets the whole previous segment (before: the window started on that
# line and its first STFT frames were reflect-padded: 1.5e-3 off on tiny.en weights at 60.0 s)
LIVE_LEFT_SAMPLES = grid.SEGMENT_SAMPLES + (ROWS_BEFORE + 1) * grid.SAMPLES_PER_STEP


def live_context(fps: int, extra_lookahead_frames: int = 0) -> AudioContext:
    """The engine's live windows: from the grid line before the one of the segment's first token row to its last
    frame's last token row (120 ms after the frame: whole frames), plus `extra_lookahead_frames` (more of the
    segment whisper sees, 1000 / fps ms of latency each)."""
    rows_after = ROWS_PER_FRAME - ROWS_BEFORE    # a frame's rows reach to the end of row int(50 t) + 5
    lookahead = -(-rows_after * int(fps) // ROWS_PER_SECOND)
    return grid.live_context(LIVE_LEFT_SAMPLES, lookahead + int(extra_lookahead_frames))


@dataclass
class LiveRequest:
    """One live call's grid segments (padded log-mel) and every frame's rows in its window."""

    grid: grid.GridRequest      # segments: (mels, 3000) log-mel each, zero-padded
    rows: np.ndarray            # (frames, 10) window rows, clipped to the rows the window has


def first_rows(start: int, num_frames: int, fps: int) -> list[int]:
    """First feature row of each frame (frame k's first sample is window sample start + k x 16000 / fps; rows
    count from window sample 0): feature2chunks' int(i x 50 / fps) - 4, in exact integer arithmetic."""
    per = grid.SAMPLES_PER_STEP * int(fps)
    return [(start * int(fps) + k * SAMPLE_RATE) // per - ROWS_BEFORE for k in range(num_frames)]


def live_request(window: torch.Tensor | np.ndarray, start: int, num_frames: int, fps: int, n_mels: int = 80,
                 device: torch.device | str = "cpu") -> LiveRequest:
    """window[0] sits on a 30 s line of the stream (its sample 0 or a multiple of 30 s after it); the log-mel
    is computed on `device`."""
    wav = window if torch.is_tensor(window) else torch.from_numpy(np.ascontiguousarray(window, np.float32))
    mel = log_mel(to_device(wav, torch.device(device)), n_mels)   # the floor: max - 8 over the window
    num_rows = mel.shape[-1] // 2
    first = first_rows(start, num_frames, fps)
    touched = grid.segments_touched(first, ROWS_PER_FRAME, num_rows)
    segments = [pad_segment(mel[:, g * SEGMENT_FRAMES:(g + 1) * SEGMENT_FRAMES]) for g in touched]
    rows = np.clip(np.asarray(first, np.int64)[:, None] + np.arange(ROWS_PER_FRAME)[None], 0, num_rows - 1)
    return LiveRequest(grid.GridRequest(touched.start, segments, first, ROWS_PER_FRAME), rows)


def live_tokens(request: LiveRequest, states: torch.Tensor) -> torch.Tensor:
    """(frames, 10 x (L + 1), dim) from the request's joined segment states. Rows read are never past the
    frames a segment has (clipped to the window's last row), so the padded steps are never read."""
    idx = torch.from_numpy(request.rows - request.grid.base)
    return _gather(states, idx)


def encode_live(segment_states: Callable[[torch.Tensor], torch.Tensor], requests: list[tuple], fps: int,
                n_mels: int = 80, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Tokens for each (window, start, num_frames): frames whose first sample is window[start], window[0] on
    the 30 s grid. segment_states: (segments, mels, 3000) -> (segments, 1500, L + 1, dim), called once for
    every segment of every request."""
    reqs = [live_request(w, start, n, fps, n_mels, device) for w, start, n in requests]
    joined = grid.encode_grid([r.grid for r in reqs], lambda mels: list(segment_states(torch.stack(mels))))
    return [live_tokens(r, states) for r, states in zip(reqs, joined)]
