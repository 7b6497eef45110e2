"""emo-stream on LiveKit: an avatar worker for LiveKit Agents, and the agent-side AvatarSession.

Needs the `livekit` extra (`pip install "emo-stream[livekit]"`); importing `emo_stream` or this
package does not import livekit, only touching one of the names below does. See docs/livekit.md.

    from emo_stream.livekit import AvatarSession          # in a voice agent
    await AvatarSession(avatar="me.jpg").start(session, room=ctx.room)
"""

from __future__ import annotations

from emo_stream.lazy_exports import lazy_exports

_EXPORTS = {
    "AvatarSession": "emo_stream.livekit.plugin",
    "AvatarWorker": "emo_stream.livekit.worker",
    "WorkerConfig": "emo_stream.livekit.worker",
    "EngineHost": "emo_stream.livekit.host",
    "EngineVideoGenerator": "emo_stream.livekit.generator",
    "DispatchInfo": "emo_stream.livekit.metadata",
    "run_avatar_job": "emo_stream.livekit.job",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, extra="livekit", needs="the livekit packages")
