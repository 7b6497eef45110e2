"""The registry of model families: the one place the CLI (`generate`, `serve`, `worker`, `convert`, `parity`),
the server config, offline generation and the benchmarks find a family: its backend by name, the family of a
checkpoint or download folder, its loader, converter, parity runner and FLOP counter.

A family is a folder, emo_stream/families/<name>/, whose `__init__.py` declares `FAMILY = Family(...)`
(see emo_stream.families for the fields), and one `register_family` line at the end of this module:

    register_family("emo_stream.families.mine")

Tests and plugins register a Family directly (callables work in place of "module:function" strings):

    register_family(Family(name="mine", title="Mine", backend=make_backend, parity=run, parity_models=("mine",)))

    create_backend("echomimic", model="downloads/EchoMimic")   # a backend by name (None: default_backend(model))
    family, found = family_of("downloads/EchoMimic")          # Family, "EchoMimic v1 download (acc weights ...)"
    model = load_model("downloads/EchoMimic")                 # dispatches on the architecture / detected family
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

from emo_stream.backend import Backend
from emo_stream.errors import ConfigError, WeightsError
from emo_stream.families import Family, resolve  # noqa: F401 (re-exported)

__all__ = ["Family", "resolve", "register_family", "unregister_family", "families", "family_names",
           "get_family", "names_phrase", "family_for_architecture", "checkpoint_architecture",
           "family_of", "load_model", "default_backend", "model_family_for", "parity_family", "parity_models",
           "model_options", "create_backend"]

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "preview"        # no backend and no model: the CPU preview animator (with a notice)
DEFAULT_MODEL_BACKEND = "emo"      # no backend but a model: the backend whose models it reads

EMO_NOTICE = (
    "no model configured: using the CPU preview animator. For real pictures pass --model DIR: an EchoMimic "
    "or Hallo download folder as it comes, or an emo-stream checkpoint (see README)."
)

CHECKPOINT_CONFIG = "config.yaml"   # written by every family's save_pretrained
ARCHITECTURE_KEY = "architecture"
DEFAULT_ARCHITECTURE = "emo"        # checkpoints written before the key existed

_FAMILIES: dict[str, Family] = {}


def register_family(family: Family | str, *, replace: bool = False) -> Family:
    """Make a family available: a Family, or the name of a family package whose `FAMILY` is read (the
    package's __init__ imports nothing heavy). Its name becomes a --backend choice, its architecture key a
    loadable checkpoint, its parity_models golden sets `emo-stream parity` replays."""
    if isinstance(family, str):
        family = getattr(importlib.import_module(family), "FAMILY", family)
    if not isinstance(family, Family):
        raise ValueError(f"register_family takes a Family, or the name of a package declaring FAMILY: got {family!r}")
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"family {family.name!r} is already registered")
    for other in _FAMILIES.values():
        if other.name == family.name:
            continue
        if family.architecture and other.architecture == family.architecture:
            raise ValueError(f"architecture {family.architecture!r} is already registered by {other.name!r}")
        shared = set(family.parity_models) & set(other.parity_models)
        if shared:
            raise ValueError(f"parity model {sorted(shared)[0]!r} is already replayed by {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a registered family (tests, plugins reloading)."""
    _FAMILIES.pop(name, None)


def families() -> tuple[Family, ...]:
    """Registered families, in registration order (built-ins first)."""
    return tuple(_FAMILIES.values())


def family_names() -> tuple[str, ...]:
    """The --backend choices (CLI, server config, benchmarks): the families with a backend, in registration
    order."""
    return tuple(name for name, f in _FAMILIES.items() if f.backend)


def get_family(name: str) -> Family:
    """The family of a backend name; unknown names are one ConfigError listing the choices."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}: choose one of {', '.join(family_names())}") from None


def names_phrase() -> str:
    """'one of preview, emo, ...': the registered backend names for error messages."""
    return "one of " + ", ".join(family_names())


# ---- checkpoints and download folders ----------------------------------------------------------------------
def family_for_architecture(architecture: str) -> Family:
    """The family of an architecture key; unknown keys are a WeightsError listing the known ones."""
    for family in _FAMILIES.values():
        if family.architecture == architecture:
            return family
    known = sorted(f.architecture for f in _FAMILIES.values() if f.architecture)
    raise WeightsError(f"unknown model architecture {architecture!r} (known: {', '.join(known)})")


def checkpoint_architecture(folder: str | Path) -> str | None:
    """The architecture key of one of our checkpoint folders ("emo" when its config has none), or None
    when `folder` holds no config.yaml (then it is not one of our checkpoints)."""
    cfg = Path(folder) / CHECKPOINT_CONFIG
    if not cfg.is_file():
        return None
    try:
        data = yaml.safe_load(cfg.read_text())
    except yaml.YAMLError as exc:
        raise WeightsError(f"{cfg}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{cfg}: expected a mapping at the top level")
    return str(data.get(ARCHITECTURE_KEY, DEFAULT_ARCHITECTURE))


def family_of(folder: str | Path) -> tuple[Family, str]:
    """(family, what was found) for a checkpoint folder or a native download folder.

    Raises WeightsError when the folder is missing or no family recognises it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    arch = checkpoint_architecture(folder)
    if arch is not None:
        family = family_for_architecture(arch)
        return family, f"{family.title} checkpoint ({folder / CHECKPOINT_CONFIG})"
    for family in _FAMILIES.values():
        found = family.detect_folder(folder)
        if found:
            return family, found
    known = ", ".join(f.title for f in _FAMILIES.values() if f.detect)
    raise WeightsError(f"{folder}: not an emo-stream checkpoint (no {CHECKPOINT_CONFIG}) and not a download "
                       f"folder of a known model ({known or 'none registered'})")


def load_model(folder: str | Path, **kwargs: Any) -> Any:
    """Load whatever model `folder` holds (our checkpoint of any family, or a native download)."""
    family, found = family_of(folder)
    log.info("loading %s", found)
    return family.load_model(folder, **kwargs)


def default_backend(model: str | None) -> str:
    """The backend used when none is named: the family of the model folder when one is given (an EchoMimic
    download -> echomimic), EMO for other models (presets, init YAML), else the preview. A folder that is
    no model at all is a WeightsError saying so (not the EMO loader's "config.yaml is missing")."""
    if not model:
        return DEFAULT_BACKEND
    if Path(model).expanduser().is_dir():
        family, _ = family_of(Path(model).expanduser())
        return family.name
    return DEFAULT_MODEL_BACKEND


def model_family_for(backend: str, model: str | Path) -> tuple[Family, str]:
    """(family, what was found) of `model`, which must be one of `backend`'s own: another family's folder is
    one ConfigError naming the backend that runs it (shared by the model backends' factories)."""
    family, found = family_of(model)
    if family.name != backend:
        raise ConfigError(f"{model} holds {family.title} weights, which --backend {backend} does not run: "
                          f"use --backend {family.name} (or leave --backend out)")
    return family, found


# ---- golden sets -----------------------------------------------------------------------------------------
def parity_family(model: str) -> Family | None:
    """The family whose parity runner replays golden sets with case.json "model" == `model`, or None."""
    return next((f for f in _FAMILIES.values() if model in f.parity_models), None)


def parity_models() -> tuple[str, ...]:
    """Every case.json "model" some registered family replays."""
    return tuple(m for f in _FAMILIES.values() for m in f.parity_models)


# ---- backends --------------------------------------------------------------------------------------------
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
    family = get_family(name)
    fps = family.default_fps if fps is None else fps   # EMO and the preview 25, EchoMimic 24
    return family.backend_factory()(model=model, size=size, fps=fps, device=device, **options)


# ---- built-in families: one line each ---------------------------------------------------------------------
register_family("emo_stream.families.preview")
register_family("emo_stream.families.emo")
register_family("emo_stream.families.echomimic")
register_family("emo_stream.families.hallo")
register_family("emo_stream.families.musetalk")
register_family("emo_stream.families.synctest")
