"""emo-stream on LiveKit: an avatar worker for LiveKit Agents, and the agent-side AvatarSession.

Needs the `livekit` extra (`pip install "emo-stream[livekit]"`); importing `emo_stream` or this
package does not import livekit, only touching one of the names below does. See docs/livekit.md.

    from emo_stream.livekit import AvatarSession          # in a voice agent
    await AvatarSession(avatar="me.jpg").start(session, room=ctx.room)
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emo_stream.livekit' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "livekit":
            raise ImportError(f"emo_stream.livekit.{name} needs the livekit packages: "
                              'pip install "emo-stream[livekit]"') from exc
        raise
