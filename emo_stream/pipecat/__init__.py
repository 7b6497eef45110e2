"""emo-stream in pipecat voice agents: a video service that makes the agent's TTS speak through an avatar.

Needs the `pipecat` extra (`pip install "emo-stream[pipecat]"`); importing `emo_stream` or this package
does not import pipecat, only touching EmoStreamVideoService does. See docs/pipecat.md.

    from emo_stream.pipecat import EmoStreamVideoService, RemoteAvatar
    avatar = EmoStreamVideoService(avatar=RemoteAvatar("http://gpu-box:8080", token=TOKEN))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmoStreamVideoService": "emo_stream.pipecat.video",
    "LocalAvatar": "emo_stream.pipecat.avatars",
    "RemoteAvatar": "emo_stream.pipecat.avatars",
    "AvatarFrame": "emo_stream.pipecat.avatars",
    "AvatarLinkError": "emo_stream.pipecat.avatars",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emo_stream.pipecat' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "pipecat":
            raise ImportError(f"emo_stream.pipecat.{name} needs pipecat: pip install \"emo-stream[pipecat]\"") from exc
        raise
