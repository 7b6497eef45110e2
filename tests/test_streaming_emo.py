"""The real EMO model (tiny preset, 64 px) behind the streaming engine: streamed audio features are the
offline generator's features, and frames come out on the timeline.

Tolerances, stated:
- streamed (any chunking, through the engine) vs offline (emo_stream.generate.iter_segments, same segment
  length): identical windows, so equal to float rounding (atol 1e-4).
- streamed vs the whole file encoded at once: wav2vec2 normalises its input and attends globally, so a
  window sees less than the whole file; with 0.8 s left context and 2 frames look-ahead the per-frame
  relative error stays below 0.8 (mean below 0.4) and the cosine similarity above 0.7 on the tiny
  preset's random weights. This bounds how far live can drift from whole-file features; live and offline
  generation themselves agree exactly (the first point).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

emo_backend = pytest.importorskip("emo_stream.families.emo.backend")

from emo_stream.streaming import EngineConfig, StreamingEngine  # noqa: E402
from tests.conftest import read_until  # noqa: E402

SPF = 640
pytestmark = pytest.mark.timeout(120)


class RecordingEmo:
    """EmoBackend, with a face-free avatar and a record of the features the engine asked for."""

    def __init__(self, backend) -> None:
        self.inner = backend
        self.features: list[np.ndarray] = []
        for name in ("name", "fps", "size", "audio_context", "new_state", "denoise", "decode", "generate"):
            setattr(self, name, getattr(backend, name))

    def prepare_avatar(self, image):
        s = self.inner.size
        return self.inner.avatar_from_crop(image, np.array([s / 4, s / 4, 3 * s / 4, 3 * s / 4], np.float32))

    def encode_audio(self, audio, start, num_frames):
        feats = self.inner.encode_audio(audio, start, num_frames)
        self.features.append(feats.numpy().copy())
        return feats


@pytest.fixture(scope="module")
def emo():
    return emo_backend.EmoBackend.load("tiny", size=64, device="cpu")


def offline_segment_features(backend, audio, clip):
    """The windows emo_stream.generate.iter_segments encodes (for whole frames, zero-padded tail)."""
    la = backend.audio_context.lookahead_frames * SPF
    left = backend.audio_context.left_samples
    total = -(-len(audio) // SPF)
    padded = np.concatenate([audio, np.zeros(total * SPF - len(audio) + la, np.float32)])
    out = []
    for first in range(0, total, clip):
        n = min(clip, total - first)
        start = first * SPF
        lo = max(0, start - left)
        out.append(backend.encode_audio(padded[lo:start + n * SPF + la], start - lo, n).numpy())
    whole = backend.encode_audio(padded, 0, total).numpy()
    return np.concatenate(out), whole


async def test_streamed_features_match_offline(emo, speech_16k):
    # a little dither so every segment counts as voiced for the energy detector and gets encoded
    audio = speech_16k + np.random.default_rng(0).standard_normal(len(speech_16k)).astype(np.float32) * 1e-4
    backend = RecordingEmo(emo)
    # no fall-behind holds here (a loaded CPU is slower than real time): every segment must be generated
    engine = StreamingEngine(backend, EngineConfig(segment_frames=8, vad=False, energy_threshold_db=-120,
                                                   max_delay_ms=1e9))
    await engine.start()
    avatar = await engine.prepare_avatar(np.full((64, 64, 3), 120, np.uint8))
    session = engine.open_session(avatar)
    pcm48 = np.repeat(audio, 3)   # 48 kHz (sample-and-hold) in odd chunks, resampled by the engine

    async def produce():
        for i in range(0, len(pcm48), 2999):
            await session.push_audio(pcm48[i:i + 2999], sample_rate=48000)
        session.end_of_speech()

    producer = asyncio.create_task(produce())
    frames = await read_until(session, lambda f: f.segment_end)
    await producer
    await engine.stop()
    speech = [f for f in frames if f.speech]
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.image.shape == (64, 64, 3) for f in frames) and all(f.voiced for f in speech)
    streamed = np.concatenate(backend.features)
    heard = np.concatenate([f.audio for f in speech])   # the 16 kHz audio the engine actually windowed

    offline, whole = offline_segment_features(emo, heard, clip=8)
    assert streamed.shape == offline.shape == whole.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-4)

    rel = np.linalg.norm(streamed - whole, axis=(1, 2)) / np.linalg.norm(whole, axis=(1, 2))
    cos = np.sum(streamed * whole, axis=(1, 2)) / (np.linalg.norm(streamed, axis=(1, 2)) *
                                                   np.linalg.norm(whole, axis=(1, 2)))
    print(f"whole-file agreement: rel max {rel.max():.3f} mean {rel.mean():.3f}, cos min {cos.min():.3f}")
    assert rel.max() < 0.8 and rel.mean() < 0.4
    assert cos.min() > 0.7
