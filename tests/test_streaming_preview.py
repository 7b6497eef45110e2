"""The CPU preview animator behind the streaming engine, end to end: a painted portrait, espeak speech,
mouth motion while speaking, idle after, the same avatar shared by two sessions."""

from __future__ import annotations

import numpy as np
import pytest

from emo_stream.streaming import EngineConfig, StreamingEngine
from tests.conftest import read_until

pytestmark = pytest.mark.timeout(60)


async def test_preview_backend_streams_speech_and_idle(speech_16k):
    from emo_stream.families.preview.backend import PreviewBackend
    from emo_stream.default_avatar import default_portrait

    backend = PreviewBackend(size=128)
    engine = StreamingEngine(backend, EngineConfig(segment_frames=4, max_sessions=2))
    await engine.start()
    portrait = default_portrait(512)
    avatar = await engine.prepare_avatar(portrait)
    a, b = engine.open_session(avatar, seed=0), engine.open_session(avatar, seed=1)
    pcm48 = (np.repeat(speech_16k, 3) * 32767).astype(np.int16)
    for s in (a, b):
        for i in range(0, len(pcm48), 1920):    # 40 ms chunks at 48 kHz
            await s.push_audio(pcm48[i:i + 1920], sample_rate=48000)
        s.end_of_speech()
    for session in (a, b):
        frames = await read_until(session, lambda f: f.segment_end)
        assert [f.index for f in frames] == list(range(len(frames)))
        speech = [f for f in frames if f.speech]
        assert len(speech) == -(-len(speech_16k) // 640)
        assert all(f.image.shape == (128, 128, 3) for f in frames)
        voiced = [f for f in speech if f.voiced]
        assert len(voiced) > len(speech) // 2                 # silero heard the espeak speech
        moving = np.std(np.stack([f.image.astype(np.float32) for f in voiced]), axis=0).mean()
        assert moving > 0.5                                    # the face moves while speaking
        st = session.stats()
        assert st["speech_frames"] >= len(speech) and st["vad"] == "silero"
    await engine.stop()
