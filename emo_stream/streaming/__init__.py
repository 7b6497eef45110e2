"""Real-time streaming engine: live audio in, lip-synced frames out, for many sessions on one backend.

    engine = StreamingEngine(backend, EngineConfig(segment_frames=8))
    await engine.start()
    avatar = await engine.prepare_avatar(rgb)
    session = engine.open_session(avatar)        # from any event loop: the session lives on it
    await session.push_audio(pcm, sample_rate=48000)
    async for frame in session.frames(): ...

See docs/streaming.md for the design, the latency model and the fall-behind policy.
"""

from emo_stream.streaming.avatars import UnknownAvatarError
from emo_stream.streaming.engine import StreamingEngine
from emo_stream.streaming.faults import BackendStalledError, EngineUnhealthyError
from emo_stream.streaming.session import StreamSession
from emo_stream.streaming.types import AvatarHandle, EngineConfig, EngineFullError, MonotonicClock, OutputFrame

__all__ = ["StreamingEngine", "StreamSession", "EngineConfig", "OutputFrame", "AvatarHandle", "EngineFullError",
           "MonotonicClock", "UnknownAvatarError", "EngineUnhealthyError", "BackendStalledError"]
