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


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: the CI box has 2 shared cores, and one thread per test
    process is much faster than oversubscribing (use via pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

    from emo_stream.default_avatar import default_portrait

    path = tmp_path_factory.mktemp("portrait") / "portrait.png"
    Image.fromarray(default_portrait(512)).save(path)
    return path


# ---- golden-format weight folders: ../shared/golden when present, else generated once per session ----------
# Tests that need only a folder in the published formats (importer errors, detection, convert, backend plumbing,
# perturbed-weight mechanics) use these; only comparisons with the authors' reference outputs or the full-size
# manifests still need ../shared/golden and skip without it (`needs_shared_golden`).
SHARED_GOLDEN = SHARED / "golden"
NO_GOLDEN = "needs ../shared/golden ({}): compares with the original code's outputs or full-size manifests"


def shared_golden(name: str) -> Path | None:
    """../shared/golden/<name> when present (made by the original repositories), else None."""
    path = SHARED_GOLDEN / name
    return path if (path / "case.json").is_file() else None


def needs_shared_golden(name: str):
    return pytest.mark.skipif(shared_golden(name) is None, reason=NO_GOLDEN.format(name))


@pytest.fixture(scope="session")
def echomimic_set(tmp_path_factory) -> Path:
    """../shared/golden/echomimic-v1, or a generated set with its layout and architecture (random weights)."""
    if (found := shared_golden("echomimic-v1")) is not None:
        return found
    import torch

    from tests.golden_sets import make_echomimic_set

    torch.set_num_threads(1)
    sampler = dict(pipeline="pipeline_echo_mimic_acc.Audio2VideoPipeline", frames=12, steps=1, guidance=1.0,
                   context=12, overlap=2, seed=21)
    root = make_echomimic_set(tmp_path_factory.mktemp("golden") / "echomimic-v1", channels=[32] * 4, layers=1,
                              heads=8, motion_heads=8, whisper_layers=1, whisper_heads=6, face_channels=[4, 8, 16, 16],
                              pe_max_len=32, image=128, weights_set="normal", samplers={"short_acc": sampler})
    # the shared set keeps whisper_tiny.pt next to the other weights
    (root / "weights" / "audio_processor" / "whisper_tiny.pt").rename(root / "weights" / "whisper_tiny.pt")
    (root / "weights" / "audio_processor").rmdir()
    return root


@pytest.fixture(scope="session")
def hallo_set(tmp_path_factory) -> Path:
    """../shared/golden/hallo, or a generated set with its layout and architecture (random weights)."""
    if (found := shared_golden("hallo")) is not None:
        return found
    import torch

    from tests.golden_sets import make_hallo_set

    torch.set_num_threads(1)
    # the shared set's architecture and clip (8 frames after 2 motion frames), which the backend tests assume
    return make_hallo_set(tmp_path_factory.mktemp("golden") / "hallo", channels=[32] * 4, layers=1, heads=8,
                          cross_dim=32, audio_dim=32, id_tokens=4, wav_layers=2, wav_heads=2, wav_inter=64,
                          proj_inter=64, context_tokens=32, motion_heads=8, pe_max_len=32, image=128,
                          clip_length=8, motion_frames=2, steps=2)
