"""Voice activity: silero-vad (bundled weights) tells espeak speech from silence and noise; the energy
fallback tells speech from silence; the engine renders silence as idle (no audio features)."""

from __future__ import annotations


import numpy as np
import pytest

from emo_stream.streaming.vad import CHUNK, VoiceActivity, load_silero
from tests.conftest import read_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def silero():
    import torch

    threads = torch.get_num_threads()
    model = load_silero()
    assert torch.get_num_threads() == threads   # silero_vad's import-time set_num_threads(1) is undone
    return model


def voiced_fraction(vad: VoiceActivity, audio: np.ndarray, step: int = 1000) -> float:
    for i in range(0, len(audio), step):   # fed in odd pieces, as the engine does
        vad.feed(audio[i:i + step])
    flags = [vad.voiced(lo, lo + CHUNK) for lo in range(0, len(audio) - CHUNK, CHUNK)]
    return float(np.mean(flags))


def test_silero_speech_vs_silence_and_noise(silero, speech_16k):
    speech = voiced_fraction(VoiceActivity(silero, hangover_samples=0), speech_16k)
    silence = voiced_fraction(VoiceActivity(silero, hangover_samples=0), np.zeros(32000, np.float32))
    noise = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.05
    hiss = voiced_fraction(VoiceActivity(silero, hangover_samples=0), noise)
    assert speech > 0.4
    assert silence == 0
    assert hiss < 0.1


def test_energy_fallback(speech_16k):
    assert voiced_fraction(VoiceActivity(None, hangover_samples=0), speech_16k) > 0.4
    assert voiced_fraction(VoiceActivity(None), np.zeros(32000, np.float32)) == 0


def test_hangover_and_reset(silero, speech_16k):
    vad = VoiceActivity(silero, hangover_samples=3200)
    vad.feed(speech_16k)
    vad.feed(np.zeros(16000, np.float32))
    raw = VoiceActivity(silero, hangover_samples=0)
    raw.feed(speech_16k)
    last = max(lo for lo in range(0, len(speech_16k) - CHUNK, CHUNK) if raw.voiced(lo, lo + 1))
    assert vad.voiced(last + CHUNK + 1600, last + CHUNK + 1601)   # within the hangover: still speech
    end = len(speech_16k) + 16000
    assert not vad.voiced(end - 8000, end)                        # half a second of silence later: not
    vad.reset(end)
    vad.feed(np.zeros(8000, np.float32))
    assert not vad.voiced(end, end + 8000)


async def test_engine_renders_silence_as_idle(speech_16k):
    """Pushed silence keeps its audio on the timeline but is rendered without features (cheap idle);
    speech right after it is picked up within its own segment."""
    from emo_stream.streaming import EngineConfig, StreamingEngine
    from test_streaming import SPF, FakeClock, TickBackend

    backend = TickBackend()
    engine = StreamingEngine(backend, EngineConfig(segment_frames=5, vad=True, vad_hangover_ms=0),
                             clock=FakeClock())
    await engine.start()
    session = engine.open_session(await engine.prepare_avatar(np.zeros((8, 8, 3), np.uint8)))
    silence = np.zeros(16000, np.float32)
    await session.push_audio(np.concatenate([silence, speech_16k]))
    session.end_of_speech()
    frames = await read_until(session, lambda f: f.segment_end)
    speech = [f for f in frames if f.speech]
    voiced = [f.voiced for f in speech]
    onset = 25   # the first frame of speech audio (1 s of silence first)
    assert not any(voiced[:onset - 5])                  # silence: idle rendering
    first_speech = int(np.argmax(np.abs(speech_16k) > 0.02)) // SPF + onset
    assert any(voiced[first_speech - 5:first_speech + 1])   # onset caught in the segment holding it
    assert np.mean(voiced[onset:]) > 0.5
    assert session.stats()["vad"] == "silero"
    assert backend.encoded < len(speech) // 5           # silent segments skipped the audio encoder
    await engine.stop()
