"""Choosing and building a backend by name: the one place the CLI, server and benchmarks go through."""

from __future__ import annotations

import logging
from typing import Any

from emo_stream.backend import Backend
from emo_stream.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("preview", "emo")

EMO_NOTICE = (
    "no EMO model configured: using the CPU preview animator. "
    "For EMO, pass --backend emo --model PATH (a trained emo-stream checkpoint, or a preset; see README)."
)


def create_backend(name: str | None = None, model: str | None = None, *, size: int = 512, fps: int = 25,
                   device: str | None = None, **options: Any) -> Backend:
    """Build a backend. With no name: EMO when a model is given, else the preview animator.

    `options` go to the backend (EMO: steps, guidance, decoder, dtype, ...); unknown ones are an error.
    """
    if name is None:
        name = "emo" if model else "preview"
        if name == "preview":
            log.warning(EMO_NOTICE)
    if name == "preview":
        from emo_stream.preview import PreviewBackend

        return PreviewBackend(size=size, fps=fps, **options)
    if name == "emo":
        from emo_stream.emo_backend import EmoBackend
        from emo_stream.models.config import PRESETS

        model = model or "tiny"
        if model in PRESETS:
            # easy to get by mistake (--backend emo without --model): say why the video will be noise
            log.warning("EMO model %r is a preset with random weights: the video will be noise. For real "
                        "output pass --model with a trained checkpoint folder (see README).", model)
        return EmoBackend.load(model, size=size, fps=fps, device=device, **options)
    raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
