"""PCM16 <-> float32 audio, and 16-bit mono WAV files: the one place the int16 scale is written.

float -> PCM16 clips to [-1, 1] and scales by 32767; PCM16 -> float divides by 32768 (what librosa, whisper's
load_audio and torchaudio return for such files, so golden sets replay exactly).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from emo_stream.errors import AudioInputError
from emo_stream.timeline import SAMPLE_RATE


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples (nominally [-1, 1]; louder ones are clipped) -> little-endian int16."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1)."""
    return np.asarray(pcm).astype(np.float32) / 32768.0


def write_wav16(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Mono float audio -> a 16-bit PCM WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm16(audio).tobytes())


def read_wav16(path: str | Path, error: type[Exception] = AudioInputError, hint: str = "") -> np.ndarray:
    """A 16 kHz mono PCM16 WAV file -> float32 (pcm16_to_float). Anything else, or an unreadable file, is one
    `error` line naming the file ("expected 16 kHz mono PCM16" + hint)."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != SAMPLE_RATE:
                raise error(f"{path}: expected 16 kHz mono PCM16{hint}")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    except (OSError, wave.Error, EOFError) as exc:
        raise error(f"{path}: cannot read ({exc})") from None
    return pcm16_to_float(pcm)
