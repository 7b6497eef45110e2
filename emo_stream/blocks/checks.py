"""The argument checks the model backends share, each one ConfigError / ImageInputError line."""

from __future__ import annotations

import numpy as np

from emo_stream.errors import ConfigError, ImageInputError
from emo_stream.timeline import samples_per_frame


def check_size(size: int, multiple: int, what: str) -> int:
    """The model's frame size: a positive multiple of `multiple` (its latent grid), `what` names the model."""
    if size <= 0 or size % multiple:
        raise ConfigError(f"size must be a positive multiple of {multiple} for {what} (got {size})")
    return size


def check_fps(fps: int) -> int:
    """fps as the 16 kHz audio clock needs it (each frame a whole number of samples) -> samples per frame."""
    try:
        return samples_per_frame(fps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_crop(image: np.ndarray, size: int) -> None:
    """An already cropped portrait given to avatar_from_crop must be (size, size)."""
    if image.shape[:2] != (size, size):
        raise ImageInputError(f"crop must be {size}x{size}, got {image.shape[1]}x{image.shape[0]}")
