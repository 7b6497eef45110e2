"""emo-stream in pipecat voice agents: a video service that makes the agent's TTS speak through an avatar.

Needs the `pipecat` extra (`pip install "emo-stream[pipecat]"`); importing `emo_stream` or this package
does not import pipecat, only touching EmoStreamVideoService does. See docs/pipecat.md.

    from emo_stream.pipecat import EmoStreamVideoService, RemoteAvatar
    avatar = EmoStreamVideoService(avatar=RemoteAvatar("http://gpu-box:8080", token=TOKEN))
"""

from __future__ import annotations

from emo_stream.lazy_exports import lazy_exports

_EXPORTS = {
    "EmoStreamVideoService": "emo_stream.pipecat.video",
    "LocalAvatar": "emo_stream.pipecat.avatars",
    "RemoteAvatar": "emo_stream.pipecat.avatars",
    "AvatarFrame": "emo_stream.pipecat.avatars",
    "AvatarLinkError": "emo_stream.pipecat.avatars",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, extra="pipecat", needs="pipecat")
