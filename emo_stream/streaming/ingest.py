"""Ingest: PCM chunks of any rate and channel count -> 16 kHz mono float32, and the bounded input queue.

Resampling uses libswresample through PyAV, which keeps its filter state between chunks: the output
does not depend on how the input was cut into chunks (chunked == whole, sample for sample).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import av
import numpy as np

from emo_stream.timeline import SAMPLE_RATE
from emo_stream.errors import AudioInputError
from emo_stream.media import to_mono_float
from emo_stream.pcm import pcm16_to_float

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 4000, 384000
MAX_CHANNELS = 16


class PcmConverter:
    """Stateful converter of one audio stream: interleaved int16/float PCM -> 16 kHz mono float32.

    A trailing partial sample frame (odd byte or channel count) is kept for the next chunk. A change
    of rate or channel count flushes the old resampler first.
    """

    def __init__(self) -> None:
        self._rate: int | None = None
        self._channels: int | None = None
        self._resampler: av.AudioResampler | None = None
        self._carry = np.zeros(0, np.float32)   # interleaved samples of an incomplete sample frame

    def convert(self, pcm, sample_rate: int, channels: int = 1) -> np.ndarray:
        sample_rate, channels = _check_format(sample_rate, channels)
        x = _as_float(pcm)
        out: list[np.ndarray] = []
        if (sample_rate, channels) != (self._rate, self._channels):
            if self._rate is not None:
                out.append(self.flush())
            self._rate, self._channels = sample_rate, channels
        if self._carry.size:
            x = np.concatenate([self._carry, x])
        whole = len(x) - len(x) % channels
        self._carry = x[whole:].copy()
        mono = to_mono_float(x[:whole], channels)
        if sample_rate == SAMPLE_RATE:
            out.append(np.array(mono, dtype=np.float32))
        elif len(mono):
            out.append(self._resample(mono))
        return np.concatenate(out) if len(out) > 1 else (out[0] if out else np.zeros(0, np.float32))

    def flush(self) -> np.ndarray:
        """Drain the resampler's delay line (end of an utterance). The next chunk starts a fresh filter."""
        self._carry = np.zeros(0, np.float32)
        if self._resampler is None:
            return np.zeros(0, np.float32)
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        self._resampler = None
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)

    def reset(self) -> None:
        """Forget buffered audio (interrupt): the next chunk starts fresh."""
        self._carry = np.zeros(0, np.float32)
        self._resampler = None

    def _resample(self, mono: np.ndarray) -> np.ndarray:
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono, np.float32).reshape(1, -1),
                                           format="flt", layout="mono")
        frame.sample_rate = self._rate
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _check_format(sample_rate, channels) -> tuple[int, int]:
    try:
        rate, ch = int(sample_rate), int(channels)
    except (TypeError, ValueError):
        raise AudioInputError(f"bad audio format: sample_rate={sample_rate!r}, channels={channels!r}") from None
    if rate != sample_rate or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioInputError(f"unsupported sample rate {sample_rate!r} (need an integer {MIN_RATE}-{MAX_RATE} Hz)")
    if ch != channels or not 1 <= ch <= MAX_CHANNELS:
        raise AudioInputError(f"unsupported channel count {channels!r} (need 1-{MAX_CHANNELS})")
    return rate, ch


def _as_float(pcm) -> np.ndarray:
    """int16 (array or little-endian bytes) or float PCM -> flat float32 in [-1, 1]."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        if len(pcm) % 2:
            raise AudioInputError("PCM16 bytes must have an even length")
        pcm = np.frombuffer(pcm, dtype="<i2")
    x = np.asarray(pcm)
    if x.dtype == np.int16:
        return pcm16_to_float(x.reshape(-1))
    if x.dtype.kind != "f":
        raise AudioInputError(f"PCM must be int16 or float: got {x.dtype}")
    x = x.reshape(-1).astype(np.float32)
    if not np.isfinite(x).all():
        raise AudioInputError("audio has invalid samples (NaN/inf)")
    return x


@dataclass
class EndOfSpeech:
    """Marker in the input queue: the utterance before it is complete."""

    time: float
    explicit: bool = True


class AudioInbox:
    """Bounded FIFO of 16 kHz audio (with arrival times) and end-of-speech marks, not yet windowed.

    Not thread-safe by itself: the session guards it with its lock.
    """

    def __init__(self, capacity_samples: int) -> None:
        self.capacity = int(capacity_samples)
        self._items: deque[tuple[np.ndarray, float] | EndOfSpeech] = deque()
        self.queued = 0  # samples

    def space(self) -> int:
        return max(0, self.capacity - self.queued)

    def put(self, samples: np.ndarray, arrival: float) -> None:
        if len(samples):
            self._items.append((samples, arrival))
            self.queued += len(samples)

    def put_end(self, marker: EndOfSpeech) -> None:
        self._items.append(marker)

    def pending(self) -> bool:
        return bool(self._items)

    def take(self, max_samples: int) -> list[tuple[np.ndarray, float] | EndOfSpeech]:
        """Up to `max_samples` samples (a chunk may be split), and the marks among them, in order."""
        out: list = []
        while self._items and max_samples > 0:
            item = self._items[0]
            if isinstance(item, EndOfSpeech):
                out.append(self._items.popleft())
                continue
            samples, t = item
            if len(samples) <= max_samples:
                self._items.popleft()
                out.append(item)
            else:
                out.append((samples[:max_samples], t))
                self._items[0] = (samples[max_samples:], t)
                samples = samples[:max_samples]
            max_samples -= len(samples)
            self.queued -= len(samples)
        # marks directly after the taken audio belong to it
        while self._items and isinstance(self._items[0], EndOfSpeech):
            out.append(self._items.popleft())
        return out

    def clear(self) -> int:
        dropped = self.queued
        self._items.clear()
        self.queued = 0
        return dropped
