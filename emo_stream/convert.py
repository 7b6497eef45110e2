"""`emo-stream convert DIR --out CKPT`: a downloaded model folder (e.g. EchoMimic v1 as published) -> our own
checkpoint (config.yaml with the architecture key + model.safetensors) that loads without the original
folder. Which family the folder holds is detected (emo_stream.registry)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emo_stream.errors import OutputError, WeightsError

log = logging.getLogger(__name__)


def convert(folder: str | Path, out: str | Path, weights_set: str | None = None) -> Path:
    from emo_stream.registry import checkpoint_architecture, family_of

    folder, out = Path(folder), Path(out)
    if folder.is_dir() and checkpoint_architecture(folder) is not None:
        raise WeightsError(f"{folder} is already an emo-stream checkpoint; nothing to convert")
    family, found = family_of(folder)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"--out {out} is not empty; choose a new folder")
    log.info("converting %s -> %s", found, out)
    options = {"weights_set": weights_set} if weights_set else {}
    if options and family.name != "echomimic":
        raise WeightsError(f"--weights-set applies to EchoMimic folders, not {family.title}")
    return family.convert_folder(folder, out, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR",
                        help="a downloaded model folder (BadToBest/EchoMimic, fudan-generative-ai/hallo or hallo2)")
    parser.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint folder to write")
    parser.add_argument("--weights-set", "--weights", dest="weights_set", choices=("acc", "normal"),
                        default=None,
                        help="EchoMimic: which weights set to convert when the folder has both (default acc)")


def run(args: argparse.Namespace) -> int:
    path = convert(args.folder, args.out, args.weights_set)
    log.info("wrote %s", path)
    return 0
