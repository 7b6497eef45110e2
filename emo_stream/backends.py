"""The backend registry: choosing and building a backend by name.

The one place the CLI (choices), the server config, `generate` and the benchmarks go through. Adding a
backend is one new file (a class following emo_stream.backend's contract plus a factory function) and
one `register_backend` line at the end of this module:

    register_backend("mine", "emo_stream.mine:create_backend", "what it is, in one line")

A factory is called as factory(model=..., size=..., fps=..., device=..., **options) and returns the
backend; it raises ConfigError for options it does not know. It is given as "module:function" so that
listing the names imports nothing heavy (torch); a callable works too (tests, plugins).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from emo_stream.backend import Backend
from emo_stream.errors import ConfigError
from emo_stream.timeline import DEFAULT_FPS

log = logging.getLogger(__name__)

Factory = Callable[..., Backend]

DEFAULT_BACKEND = "preview"        # no backend and no model: the CPU preview animator (with a notice)
DEFAULT_MODEL_BACKEND = "emo"      # no backend but a model: the backend whose models it reads

EMO_NOTICE = (
    "no model configured: using the CPU preview animator. For real pictures pass --model DIR: an EchoMimic "
    "or Hallo download folder as it comes, or an emo-stream checkpoint (see README)."
)


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its name, how to build it, one line for --help."""

    name: str
    factory: str | Factory          # "package.module:function" (imported on first use) or a callable
    summary: str = ""
    default_fps: int = DEFAULT_FPS  # the video rate when none is asked for (offline generate)

    def load_factory(self) -> Factory:
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, BackendSpec] = {}


def register_backend(name: str, factory: str | Factory, summary: str = "", *, replace: bool = False,
                     default_fps: int = DEFAULT_FPS) -> BackendSpec:
    """Make a backend available under `name` (CLI --backend, server config `backend:`, benchmarks)."""
    if not name or not name.replace("-", "").replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"backend names are lower-case words (letters, digits, - and _): got {name!r}")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"backend factory must be 'module:function' or a callable: got {factory!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    spec = BackendSpec(name, factory, summary, default_fps)
    _REGISTRY[name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Remove a registered backend (tests, plugins reloading)."""
    _REGISTRY.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """Registered names, in registration order (built-ins first)."""
    return tuple(_REGISTRY)


def backend_spec(name: str) -> BackendSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def names_phrase() -> str:
    """'one of preview, emo, ...': the registered names for error messages."""
    return "one of " + ", ".join(_REGISTRY)


# model family (emo_stream.models.families) -> the backend that runs it, when it is not DEFAULT_MODEL_BACKEND
FAMILY_BACKENDS = {"echomimic-v1": "echomimic", "hallo": "hallo", "musetalk": "musetalk"}


def family_backend(family_name: str) -> str:
    """The backend that runs a model family (architecture key "echomimic-v1" -> "echomimic")."""
    return FAMILY_BACKENDS.get(family_name, DEFAULT_MODEL_BACKEND)


def default_backend(model: str | None) -> str:
    """The backend used when none is named: the one that runs the model's family when a model folder is
    given (an EchoMimic download -> echomimic), EMO for other models, else the preview. A folder that is
    no model at all is a WeightsError saying so (not the EMO loader's "config.yaml is missing")."""
    if not model:
        return DEFAULT_BACKEND
    from pathlib import Path

    if Path(model).expanduser().is_dir():
        from emo_stream.models.families import family_of

        family, _ = family_of(Path(model).expanduser())
        return family_backend(family.name)
    return DEFAULT_MODEL_BACKEND


def model_family_for(backend: str, model: str, family_name: str):
    """(family, what was found) of `model`, which the `backend` runs only for `family_name`: any other
    family is one ConfigError naming the backend that runs it (shared by the model backends' factories)."""
    from emo_stream.models.families import family_of

    family, found = family_of(model)
    if family.name != family_name:
        raise ConfigError(f"{model} holds {family.title} weights, which --backend {backend} does not run: "
                          f"use --backend {family_backend(family.name)} (or leave --backend out)")
    return family, found


def torch_device(device: str | None):
    """--device -> torch.device (default cuda when available, else cpu); bad or unavailable ones are one
    ConfigError line. Shared by the model backends' factories."""
    import torch

    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
    return dev


def model_options(backend: str, *, steps: int | None = None, guidance: float | None = None,
                  decoder: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """The sampling settings a user gave (None = the model's default) as backend options, checked once for
    generate, serve and worker alike. Each backend still refuses options it does not take."""
    import math

    options: dict[str, Any] = {}
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"steps must be at least 1: got {steps}")
        options["steps"] = steps
    if guidance is not None:
        if not math.isfinite(guidance) or guidance <= 0:
            raise ConfigError(f"guidance must be a positive number (1 = no guidance): got {guidance}")
        options["guidance"] = guidance
    if decoder is not None:
        if decoder not in ("vae", "taesd"):
            raise ConfigError(f"decoder must be vae or taesd: got {decoder!r}")
        options["decoder"] = decoder
    if weights is not None:
        if backend != "echomimic":   # said in the flag's words, not as an unknown backend option
            raise ConfigError(f"--weights applies to EchoMimic models, not the {backend} backend")
        if weights not in ("acc", "normal"):
            raise ConfigError(f"weights must be acc or normal: got {weights!r}")
        options["weights_set"] = weights
    return options


def create_backend(name: str | None = None, model: str | None = None, *, size: int = 512, fps: int | None = None,
                   device: str | None = None, **options: Any) -> Backend:
    """Build a backend by name. With no name: `default_backend(model)` (the preview says why).

    `options` go to the backend (EMO: steps, guidance, decoder, dtype, ...); unknown ones are an error.
    """
    if name is None:
        name = default_backend(model)
        if name == DEFAULT_BACKEND:
            log.info(EMO_NOTICE)  # the normal first run: no warning each time
    spec = backend_spec(name)
    fps = spec.default_fps if fps is None else fps   # EMO and the preview 25, EchoMimic 24
    return spec.load_factory()(model=model, size=size, fps=fps, device=device, **options)


# ---- built-in backends: one line each -----------------------------------------------------------------
register_backend("preview", "emo_stream.preview.backend:create_backend",
                 "CPU preview animator: warps the portrait to the audio (no model, real-time on one core)")
register_backend("emo", "emo_stream.emo_backend:create_backend",
                 "EMO diffusion model (--model: a checkpoint folder or a preset: tiny, sd15)")
register_backend("echomimic", "emo_stream.echomimic_backend:create_backend",
                 "EchoMimic v1 (--model: the BadToBest/EchoMimic download folder as it comes, acc or normal weights)",
                 default_fps=24)
register_backend("hallo", "emo_stream.hallo_backend:create_backend",
                 "Hallo / Hallo2 (--model: the fudan-generative-ai/hallo or hallo2 download folder as it comes; slow, best fidelity)")
register_backend("musetalk", "emo_stream.families.musetalk.backend:create_backend",
                 "MuseTalk 1.5 (--model: MuseTalk's models/ download folder as it comes): real-time lip sync of the mouth region")
register_backend("synctest", "emo_stream.families.synctest.backend:create_backend",
                 "A/V sync test pattern: a flash following each frame's audio envelope and a frame counter (no model)")
