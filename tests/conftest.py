"""Shared fixtures: test inputs are made here (espeak-ng speech) or read from ../shared/data (skipped if absent)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real portraits, speech, clips); tests using it skip cleanly without it."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def espeak_wav(path: Path, text: str, rate: int = 16000) -> Path:
    """Speech made with espeak-ng (and resampled with sox when another rate is asked for)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    if rate == 22050:
        raw.rename(path)
    else:
        from emo_stream.media import load_audio
        import wave

        x = load_audio(raw, sample_rate=rate)
        pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        raw.unlink()
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """About 2.5 s of English speech, 16 kHz mono WAV."""
    return espeak_wav(tmp_path_factory.mktemp("speech") / "speech.wav", "Hello there, how are you today?")


@pytest.fixture(scope="session")
def speech_16k(speech_wav) -> np.ndarray:
    from emo_stream.media import load_audio

    return load_audio(speech_wav)


@pytest.fixture(scope="session")
def portrait_path(shared_data) -> Path:
    return shared_data / "clips" / "short_case_10" / "ref.jpg"
