"""Shared fixtures: test inputs are made here (espeak-ng speech, the built-in portrait) or read from
../shared/data, which only adds realism (real photos and clips): core behaviour is tested without it.

EMO_TESTS_NO_SHARED=1 runs the tests as a fresh clone without ../shared would (nothing there is read)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if os.environ.get("EMO_TESTS_NO_SHARED"):
    SHARED = REPO / ".no-shared"  # as in a fresh clone: no ../shared next to it
SHARED_DATA = SHARED / "data"


async def read_until(session, pred, limit: int = 5000) -> list:
    """A streaming session's frames up to and including the first for which pred(frame) holds (at most
    `limit`): e.g. read_until(session, lambda f: f.segment_end) reads one utterance."""
    frames = []
    async for f in session.frames():
        frames.append(f)
        if pred(f) or len(frames) >= limit:
            break
    return frames


def shared_data_dir() -> Path | None:
    """../shared/data when present (real portraits, speech, clips), else None."""
    return SHARED_DATA if (SHARED_DATA / "README.md").is_file() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real portraits, speech, clips); tests using it skip cleanly without it."""
    if shared_data_dir() is None:
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
def portrait_path(tmp_path_factory) -> Path:
    """A real photo from ../shared/data when present, else the built-in painted portrait (512 px)."""
    if shared_data_dir() is not None:
        return SHARED_DATA / "clips" / "short_case_10" / "ref.jpg"
    from PIL import Image

    from emo_stream.preview.default_avatar import default_portrait

    path = tmp_path_factory.mktemp("portrait") / "portrait.png"
    Image.fromarray(default_portrait(512)).save(path)
    return path
