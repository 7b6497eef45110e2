"""emo-stream: EMO (Emote Portrait Alive) talking-avatar generation, offline and streaming.

The library never imports the networking layer (`server`); it is usable from a notebook.
"""

from emo_stream.errors import (
    AudioInputError,
    ConfigError,
    EmoStreamError,
    ImageInputError,
    NoFaceError,
    WeightsError,
)

__version__ = "0.1.0"

__all__ = [
    "AudioInputError",
    "ConfigError",
    "EmoStreamError",
    "ImageInputError",
    "NoFaceError",
    "WeightsError",
    "__version__",
]
