"""Model families: which architecture a checkpoint (or a download folder) holds, and how to load it.

Every checkpoint we write carries an architecture key in its config.yaml (`architecture: echomimic-v1`);
checkpoints without one are EMO (`emo`, what every checkpoint before the key existed holds). This module
is the one registry from that key to the code of the family. Entry points are "module:function" strings,
imported only when used, so importing the registry pulls in no model code.

    name      the architecture key ("emo", "echomimic-v1", "hallo")
    title     a human name for messages ("EchoMimic v1")
    load      function(path, device=None, dtype=None) -> model. `path` is one of our checkpoint folders
              of this family, or a native download folder that `detect` recognises.
    detect    function(folder: Path) -> str | None: None when `folder` is not a native download of this
              family, else a one-line description of what was found, e.g. "EchoMimic v1 download
              (acc weights: denoising_unet_acc.pth, motion_module_acc.pth)". Our own checkpoints are
              recognised by their architecture key instead, never by `detect`.
    convert   function(folder: Path, out: Path, **options) -> Path: native download -> our checkpoint (config.yaml with
              the architecture key + safetensors) that loads without the original folder; None if the
              family has no native format.

Adding a family (e.g. Hallo): put its code under emo_stream/models/<family>/, and add one
`register(ModelFamily(...))` call at the bottom of this file. Golden-set replays live in emo_stream.parity.

    from emo_stream.models.families import family_of, load_model
    family, found = family_of("downloads/EchoMimic")   # ModelFamily, "EchoMimic v1 download (acc weights ...)"
    model = load_model("downloads/EchoMimic")           # dispatches on the architecture / detected family
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from emo_stream.errors import WeightsError

log = logging.getLogger(__name__)

CHECKPOINT_CONFIG = "config.yaml"   # written by every family's save_pretrained
ARCHITECTURE_KEY = "architecture"
DEFAULT_ARCHITECTURE = "emo"        # checkpoints written before the key existed


def resolve(entry: str) -> Callable[..., Any]:
    """"package.module:function" -> the function (imported now)."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    title: str
    load: str                      # "module:function", see the module docstring
    detect: str | None = None      # "module:function" or None (no native download format)
    convert: str | None = None     # "module:function" or None

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        return resolve(self.load)(Path(path), **kwargs)

    def detect_folder(self, folder: str | Path) -> str | None:
        return resolve(self.detect)(Path(folder)) if self.detect else None

    def convert_folder(self, folder: str | Path, out: str | Path, **options: Any) -> Path:
        """options: family-specific (EchoMimic: weights_set); only passed when given."""
        if not self.convert:
            raise WeightsError(f"{self.title} has no native download format to convert from")
        return resolve(self.convert)(Path(folder), Path(out), **options)


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The family of an architecture key; unknown keys are a WeightsError listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise WeightsError(f"unknown model architecture {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


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


def family_of(folder: str | Path) -> tuple[ModelFamily, str]:
    """(family, what was found) for a checkpoint folder or a native download folder.

    Raises WeightsError when the folder is missing or no family recognises it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    arch = checkpoint_architecture(folder)
    if arch is not None:
        family = get_family(arch)
        return family, f"{family.title} checkpoint ({folder / CHECKPOINT_CONFIG})"
    for family in FAMILIES.values():
        found = family.detect_folder(folder)
        if found:
            return family, found
    known = ", ".join(f.title for f in FAMILIES.values() if f.detect)
    raise WeightsError(f"{folder}: not an emo-stream checkpoint (no {CHECKPOINT_CONFIG}) and not a download "
                       f"folder of a known model ({known or 'none registered'})")


def load_model(folder: str | Path, **kwargs: Any) -> Any:
    """Load whatever model `folder` holds (our checkpoint of any family, or a native download)."""
    family, found = family_of(folder)
    log.info("loading %s", found)
    return family.load_model(folder, **kwargs)


# ---- the families ------------------------------------------------------------------------------------
register(ModelFamily(name="emo", title="EMO", load="emo_stream.models.emo_model:load_emo_checkpoint"))
register(ModelFamily(name="echomimic-v1", title="EchoMimic v1",
                     load="emo_stream.models.echomimic.importer:load",
                     detect="emo_stream.models.echomimic.importer:detect",
                     convert="emo_stream.models.echomimic.importer:convert"))
register(ModelFamily(name="hallo", title="Hallo / Hallo2", load="emo_stream.models.hallo.loader:load_hallo",
                     detect="emo_stream.models.hallo.loader:detect", convert="emo_stream.models.hallo.loader:convert"))
register(ModelFamily(name="musetalk", title="MuseTalk 1.5", load="emo_stream.families.musetalk.loader:load",
                     detect="emo_stream.families.musetalk.loader:detect",
                     convert="emo_stream.families.musetalk.loader:convert"))
