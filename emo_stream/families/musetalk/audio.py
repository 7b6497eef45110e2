"""MuseTalk's audio path: whisper-tiny encoder hidden states and the per-frame audio prompts.

    mel    = log_mel(wav)                         # WhisperFeatureExtractor: (n, 80, 3000) per 30 s segment
    states = encoder_states(encoder, mel)         # (steps, layers + 1, d) at 50 Hz, every segment concatenated
    chunks = frame_chunks(states, n_samples, fps) # (frames, 2 (left + right + 1) (layers + 1), d)

`states` are the embeddings plus every encoder layer's output (the last one after the final layer norm),
as `WhisperEncoder(output_hidden_states=True)` returns them. The encoder is run here layer by layer from
its own modules, so inputs shorter than 30 s also work and the result does not depend on how a
transformers version collects hidden states.

Live (`encode_requests`, below): the same 30 s grid over a stream, each segment encoded with the samples
received so far, several sessions' segments in one encoder call.

A frame's prompt is 2 (left + right + 1) whisper steps around it (2 steps per frame at 25 fps), zero-padded
before the first step and after the last, every layer of each step: MuseTalk's get_whisper_chunk.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from emo_stream.backend import AudioContext
from emo_stream.blocks import whisper_grid as grid
# the grid's constants and request, here too for MuseTalk's callers
from emo_stream.blocks.whisper_grid import SEGMENT_SAMPLES, SEGMENT_STEPS, WHISPER_HZ, GridRequest  # noqa: F401
from emo_stream.execution import to_device
from emo_stream.timeline import SAMPLE_RATE


def log_mel(extractor, wav: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(segments, mels, 3000) float32: the feature extractor on each 30 s segment (zero-padded), as MuseTalk.
    device: where the extractor's torch STFT runs (the live path uses the model's GPU)."""
    wav = np.asarray(wav, np.float32)
    segments = [wav[i:i + SEGMENT_SAMPLES] for i in range(0, max(len(wav), 1), SEGMENT_SAMPLES)]
    feats = [extractor(s, return_tensors="pt", sampling_rate=SAMPLE_RATE, device=device).input_features
             for s in segments]
    return torch.cat(feats, dim=0)


def device_log_mel(extractor, wav: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, mels, 3000) float32 on `device`: one 30 s segment (zero-padded) through the extractor's torch path,
    op for op (tests/test_device_discipline.py checks it equals the extractor on the CPU), but computed where
    the model is and left there. The extractor's own device path copies the samples in with a blocking copy and
    the result back to the host (a sync), and the encoder then copies it in again: per session, per segment."""
    x = np.zeros((1, extractor.n_samples), np.float32)
    wav = np.asarray(wav, np.float32)[: extractor.n_samples]
    x[0, : len(wav)] = wav
    waveform = to_device(torch.from_numpy(x), device)
    cache = extractor.__dict__.setdefault("_emo_device_tables", {})   # per device: window and mel filters, once
    key = str(device)
    if key not in cache:
        cache[key] = (torch.hann_window(extractor.n_fft, device=device),
                      to_device(torch.from_numpy(np.asarray(extractor.mel_filters)).float(), device))
    window, mel_filters = cache[key]
    stft = torch.stft(waveform, extractor.n_fft, extractor.hop_length, window=window, return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).contiguous()
    log_spec = torch.clamp(mel_filters.T @ magnitudes, min=1e-10).log10()
    max_val = log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0]
    log_spec = torch.maximum(log_spec, max_val - 8.0)
    return (log_spec + 4.0) / 4.0


def encoder_states(encoder, mel: torch.Tensor) -> torch.Tensor:
    """(segments, mels, T) -> (segments, T / 2, layers + 1, d): the encoder's hidden states, stacked (the last
    layer's after the final layer norm, as WhisperEncoder(output_hidden_states=True) returns them)."""
    return grid.encoder_states(encoder, mel, final_norm=True)


def file_states(encoder, extractor, wav: np.ndarray) -> torch.Tensor:
    """(steps, layers + 1, d) for a whole file: every 30 s segment's states, concatenated, trimmed to the
    audio's own length (floor(seconds x 50) steps)."""
    states = encoder_states(encoder, log_mel(extractor, wav))
    states = states.reshape(-1, *states.shape[2:])
    return states[: math.floor(len(wav) / SAMPLE_RATE * WHISPER_HZ)]


def frame_chunks(states: torch.Tensor, num_frames: int, fps: int, left: int = 2, right: int = 2,
                 first_frame: int = 0, pad_before: bool = True) -> torch.Tensor:
    """(steps, L, d) -> (num_frames, 2 (left + right + 1) L, d): each frame's audio prompt, time-major.

    Frame f's prompt starts at step floor(f x 50 / fps) of the zero-padded states (2 left x ceil(50 / fps)
    zero steps first, unless `pad_before` is False: then `states` already hold that many real steps of left
    context). Steps past the end are zeros. first_frame: the index of the first frame wanted."""
    per = WHISPER_HZ / int(fps)
    pad = math.ceil(per)
    width = 2 * (left + right + 1)
    lead = pad * left if pad_before else 0
    first = [math.floor((first_frame + f) * per) for f in range(num_frames)]
    # the indices are known on the host: no device read for their maximum, no blocking copy
    idx = to_device(torch.tensor(first, dtype=torch.long), states.device)
    need = max(first) + width if num_frames else 0
    tail = max(0, need - (lead + states.shape[0]))
    padded = torch.cat([states.new_zeros(lead, *states.shape[1:]), states,
                        states.new_zeros(tail, *states.shape[1:])])
    rows = idx[:, None] + torch.arange(width, device=states.device)[None]
    return padded[rows].flatten(1, 2)


def file_chunks(encoder, extractor, wav: np.ndarray, fps: int = 25, left: int = 2, right: int = 2) -> torch.Tensor:
    """MuseTalk's whole-file audio prompts: floor(seconds x fps) frames."""
    num_frames = math.floor(len(wav) / SAMPLE_RATE * fps)
    return frame_chunks(file_states(encoder, extractor, wav), num_frames, fps, left, right)


# ---- live: a stream on MuseTalk's 30 s grid (emo_stream.blocks.whisper_grid) ------------------------------------
# MuseTalk cuts a file into 30 s segments from its first sample and encodes each one zero-padded to 30 s. The live
# path keeps that grid: each segment the prompts touch is encoded with the samples received so far, zero-padded
# exactly as MuseTalk pads a file's last segment. The only difference left is the audio not yet received
# (bench/musetalk_window.py).


def lead_samples(fps: int, left: int = 2) -> int:
    """Audio before a frame's first sample that its prompt reaches back to (left x ceil(50 / fps) steps)."""
    return math.ceil(WHISPER_HZ / int(fps)) * left * SAMPLE_RATE // WHISPER_HZ


def prompt_steps(start: int, num_frames: int, fps: int, left: int = 2) -> list[int]:
    """First step of each frame's prompt; frame k's first sample is window sample start + k x 16000 / fps and
    steps count from window sample 0 (a grid boundary: get_whisper_chunk's floor(frame x 50 / fps) - lead)."""
    lead = math.ceil(WHISPER_HZ / int(fps)) * left
    return [math.floor(start * WHISPER_HZ / SAMPLE_RATE + k * WHISPER_HZ / int(fps) + 1e-9) - lead
            for k in range(num_frames)]


def grid_request(window: np.ndarray, start: int, num_frames: int, fps: int, left: int = 2,
                 right: int = 2) -> GridRequest:
    """window[0] sits on a 30 s boundary of the stream (its sample 0 or a multiple of 30 s after it)."""
    window = np.asarray(window, np.float32)
    steps = prompt_steps(start, num_frames, fps, left)
    width = 2 * (left + right + 1)
    touched = grid.segments_touched(steps, width)
    segments = [window[g * SEGMENT_SAMPLES:(g + 1) * SEGMENT_SAMPLES] for g in touched]
    return GridRequest(touched.start, segments, steps, width)


def encode_segments(encoder, extractor, segments: list[np.ndarray], padded: bool = True) -> list[torch.Tensor]:
    """Each segment's states (1500 or, unpadded, its own steps, layers + 1, d), every segment zero-padded to
    30 s as MuseTalk pads a file's last one; padded segments go through the encoder in one batched call.
    padded=False: the encoder sees only the steps received (cheaper; an input whisper never saw in training)."""
    device = encoder.conv1.weight.device
    if device.type != "cpu" and not getattr(extractor, "dither", 0.0):
        # on an accelerator the mel is computed there and stays there: no host round trip per segment (the
        # extractor's own device path copies the samples in blocking and its result back to the host)
        mel = torch.cat([device_log_mel(extractor, seg, device) for seg in segments])
    else:
        mel = log_mel_batch(extractor, segments)
    if padded:
        return list(encoder_states(encoder, mel))
    out = []
    for seg, m in zip(segments, mel):
        steps = max(1, math.ceil(len(seg) * WHISPER_HZ / SAMPLE_RATE))
        out.append(encoder_states(encoder, m[None, :, : 2 * steps])[0])
    return out


def log_mel_batch(extractor, segments: list[np.ndarray], device: str = "cpu") -> torch.Tensor:
    """(n, mels, 3000): log_mel of each segment (each at most 30 s; an empty one is silence)."""
    return torch.cat([log_mel(extractor, s if len(s) else np.zeros(1, np.float32), device) for s in segments])


def grid_chunks(request: GridRequest, states: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """(frames, width x L, d): the prompts from the request's encoded segments (zeros before the stream)."""
    joined = states if torch.is_tensor(states) else torch.cat(states)
    return chunks_at(joined, [s - request.base for s in request.steps], request.width)


def encode_requests(encoder, extractor, requests: list[tuple[np.ndarray, int, int]], fps: int, left: int = 2,
                    right: int = 2, padded: bool = True) -> list[torch.Tensor]:
    """Prompts for each (window, start, num_frames): frames whose first sample is window[start], window[0] on
    the 30 s grid. Every segment the requests touch goes through the encoder in one batched call."""
    reqs = [grid_request(w, start, n, fps, left, right) for w, start, n in requests]
    joined = grid.encode_grid(reqs, lambda segs: encode_segments(encoder, extractor, segs, padded))
    return [grid_chunks(r, states) for r, states in zip(reqs, joined)]


def stream_chunks(encoder, extractor, window: np.ndarray, start: int, num_frames: int, fps: int, left: int = 2,
                  right: int = 2, padded: bool = True) -> torch.Tensor:
    """encode_requests for one window."""
    return encode_requests(encoder, extractor, [(window, start, num_frames)], fps, left, right, padded)[0]


def live_context(fps: int, left: int = 2, right: int = 2, extra_lookahead_frames: int = 0) -> AudioContext:
    """The live windows: from the 30 s grid line at or before the first prompt's left reach (whole frames)
    to the last prompt's right reach plus `extra_lookahead_frames` (more of the segment whisper sees)."""
    spf = SAMPLE_RATE // int(fps)
    return grid.live_context(-(-lead_samples(fps, left) // spf) * spf, right + int(extra_lookahead_frames))


def chunks_at(states: torch.Tensor, first_steps: list[int], width: int) -> torch.Tensor:
    """(frames, width x L, d): for each frame, states[s : s + width] with zeros where s runs outside them
    (MuseTalk's zero padding before the first and after the last step)."""
    lo = min(first_steps)
    hi = max(first_steps) + width
    before, after = max(0, -lo), max(0, hi - states.shape[0])
    padded = torch.cat([states.new_zeros(before, *states.shape[1:]), states, states.new_zeros(after, *states.shape[1:])])
    # built on the host and sent without blocking (torch.tensor(..., device=) waits for the device)
    idx = to_device(torch.tensor(first_steps), states.device)[:, None] + before + torch.arange(width, device=states.device)
    return padded[idx].flatten(1, 2)
