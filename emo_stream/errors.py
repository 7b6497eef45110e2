"""Errors a user can cause. Each carries a one-line message fit to show as-is (CLI, WebSocket reply)."""


class EmoStreamError(Exception):
    """Base of every user-facing error: bad input, missing weights, bad config."""


class ImageInputError(EmoStreamError):
    """The portrait could not be read or is not an image."""


class NoFaceError(ImageInputError):
    """The portrait was read but no face was found in it."""


class AudioInputError(EmoStreamError):
    """The audio is unreadable, empty, too short, or in an unsupported format."""


class WeightsError(EmoStreamError):
    """A model folder or checkpoint is missing, incomplete or does not match the config."""


class ConfigError(EmoStreamError):
    """A configuration file or value is invalid."""


class OutputError(EmoStreamError):
    """An output file cannot be written (missing permission, a folder in the way, disk full)."""
