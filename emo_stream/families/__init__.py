"""Model families: one folder each (its model, download-folder detection and loading, conversion, parity
runner, sampling and backend), declared by a `FAMILY = Family(...)` in the folder's `__init__.py`.

    emo_stream/families/<name>/__init__.py     FAMILY = Family(name=..., backend="module:function", ...)
    emo_stream/registry.py                     register_family("emo_stream.families.<name>")   (one line)

A family's `__init__.py` imports nothing heavy (no torch): every entry point is a "package.module:function"
string, imported on first use, so listing the families (CLI choices, --help) stays cheap. Callables work
too (tests, plugins). No family imports another family; what two or more share is in emo_stream.blocks.
The registry (emo_stream.registry) is how the rest of the package reaches a family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emo_stream.errors import ConfigError, WeightsError
from emo_stream.timeline import DEFAULT_FPS

def resolve(entry: str | Callable[..., Any]) -> Callable[..., Any]:
    """"package.module:function" -> the function (imported now); a callable is returned as it is."""
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """One model family. Entry points are "module:function" strings (or callables):

    name           the backend name: CLI --backend, server config `backend:`, benchmarks ("echomimic")
    title          a human name for messages ("EchoMimic v1")
    summary        one line for --help
    backend        factory(model=..., size=..., fps=..., device=..., **options) -> Backend; raises ConfigError
                   for options it does not take. None: a model family without a backend yet (it loads,
                   converts and replays golden sets, but is no --backend choice)
    architecture   the `architecture` key our checkpoints of this family carry in config.yaml
                   ("echomimic-v1"), or None for a family without weights (the preview)
    detect         function(folder: Path) -> str | None: a one-line description of the native download found
                   in `folder` (e.g. "EchoMimic v1 download (acc weights: ...)"), None when it is not one.
                   Our own checkpoints are recognised by their architecture key, never by `detect`.
    load           function(path: Path, device=None, dtype=None, **options) -> model, for our checkpoint of
                   this family or a folder `detect` recognises
    convert        function(folder: Path, out: Path, **options) -> Path: native download -> our checkpoint
    parity         run_cases(golden_dir: Path[, only: set[str]]) -> {case: max abs error} (emo_stream.parity)
    parity_models  the case.json "model" values whose golden sets `parity` replays ("echomimic-v1",)
    flops          records(size: int) -> list of FLOP records (bench/flops.py)
    default_fps    the video rate when none is asked for (offline generate)
    """

    name: str
    title: str
    summary: str = ""
    backend: str | Callable[..., Any] | None = None
    architecture: str | None = None
    detect: str | Callable[..., Any] | None = None
    load: str | Callable[..., Any] | None = None
    convert: str | Callable[..., Any] | None = None
    parity: str | Callable[..., Any] | None = None
    parity_models: tuple[str, ...] = ()
    flops: str | Callable[..., Any] | None = None
    default_fps: int = DEFAULT_FPS

    def __post_init__(self) -> None:
        name = self.name
        if not name or not name.replace("-", "").replace("_", "").isalnum() or name != name.lower():
            raise ValueError(f"family names are lower-case words (letters, digits, - and _): got {name!r}")
        for field in ("backend", "detect", "load", "convert", "parity", "flops"):
            entry = getattr(self, field)
            if isinstance(entry, str) and entry and ":" not in entry:
                raise ValueError(f"{name}: {field} must be 'module:function' or a callable: got {entry!r}")
        if isinstance(self.parity_models, str):   # ("hallo") is a string, not a tuple: say so
            raise ValueError(f"{name}: parity_models must be a tuple of names, got {self.parity_models!r}")
        if self.parity_models and not self.parity:
            raise ValueError(f"{name}: parity_models given without a parity runner")

    def backend_factory(self) -> Callable[..., Any]:
        if not self.backend:
            raise ConfigError(f"{self.title} has no backend yet: it loads, converts and replays golden sets, "
                              f"but cannot animate (--backend)")
        return resolve(self.backend)

    def detect_folder(self, folder: str | Path) -> str | None:
        return resolve(self.detect)(Path(folder)) if self.detect else None

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        if not self.load:
            raise WeightsError(f"{self.title} has no model to load")
        return resolve(self.load)(Path(path), **kwargs)

    def convert_folder(self, folder: str | Path, out: str | Path, **options: Any) -> Path:
        """options: family-specific (EchoMimic: weights_set); only passed when given."""
        if not self.convert:
            raise WeightsError(f"{self.title} has no native download format to convert from")
        return resolve(self.convert)(Path(folder), Path(out), **options)

    def parity_runner(self) -> Callable[..., dict[str, float]]:
        if not self.parity:
            raise WeightsError(f"{self.title} has no parity runner")
        return resolve(self.parity)

    def flop_records(self, size: int) -> list[dict[str, Any]]:
        if not self.flops:
            return []
        return list(resolve(self.flops)(size))
