"""`emo-stream parity GOLDEN_DIR`: replay a golden set against our importer and report the max abs errors.

A golden set is a folder holding a `case.json` (whose "model" names the family, e.g. "echomimic-v1"), the
reference implementation's weights in their published file formats, fixed inputs and the reference
outputs. The runner of that family loads the weights through the same importer users run, replays every
case the set lists and returns {case name: max abs error vs the reference output} (fp32).

The command prints that dict as JSON and exits 1 when any error is above the tolerance (1e-4 unless
--tolerance says otherwise), 2 with one line on stderr when the folder is not a golden set or its files
are broken (naming the file, and the key and shape for weights).

Pictures stored as uint8 are compared in grey levels: a runner returns those errors as `GreyLevels(value)` (a
float that carries its unit), and they are held to GREY_TOLERANCE (1 level, --grey-tolerance) instead of
the float tolerance; their case names end in " (grey levels)" so the printed JSON says so too.

Adding a family's runner: write `run_cases(golden_dir: Path) -> dict[str, float]` in its folder (raise
GoldenFormatError / WeightsError, one line, for a folder not in the format) and name it in the family's
declaration with the case.json["model"] values its sets use (emo_stream.registry finds it). A runner may also
accept `only: set[str]` (the case groups to replay, e.g. {"denoiser_single"}), which `--case` passes:

    FAMILY = Family(name="hallo", ..., parity="emo_stream.families.hallo.parity:run_cases", parity_models=("hallo",))
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Callable

from emo_stream.config_io import read_json
from emo_stream.errors import EmoStreamError

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
GREY_TOLERANCE = 1.0   # uint8 pictures: at most one grey level off (rounding of a float pipeline)
GREY_SUFFIX = " (grey levels)"
CASE_FILE = "case.json"


class GreyLevels(float):
    """A case's max abs error in grey levels of a uint8 picture: held to the grey tolerance, not the float one."""


def grey_levels(ours, reference) -> GreyLevels:
    """Max abs difference of two uint8 pictures (arrays or tensors of the same shape), in grey levels."""
    import numpy as np

    a = np.asarray(ours.cpu() if hasattr(ours, "cpu") else ours).astype(np.int32)
    b = np.asarray(reference.cpu() if hasattr(reference, "cpu") else reference).astype(np.int32)
    if a.shape != b.shape:
        return GreyLevels(float("inf"))
    return GreyLevels(float(np.abs(a - b).max()) if a.size else 0.0)


class GoldenFormatError(EmoStreamError):
    """The folder is not a golden set in the expected format (missing case.json, file or tensor)."""


def read_case(golden_dir: str | Path) -> dict:
    """case.json of a golden set, checked to be a JSON object with a "model" string."""
    golden_dir = Path(golden_dir)
    if golden_dir.exists() and not golden_dir.is_dir():
        raise GoldenFormatError(f"{golden_dir} is a file, not a golden set folder (give the folder holding "
                                f"{CASE_FILE})")
    if not golden_dir.is_dir():
        raise GoldenFormatError(f"golden folder not found: {golden_dir}")
    path = golden_dir / CASE_FILE
    case = read_json(path, GoldenFormatError, f"{golden_dir} is not a golden set: no {CASE_FILE}")
    if not isinstance(case.get("model"), str):
        raise GoldenFormatError(f"{path}: expected a JSON object with a \"model\" name")
    return case


def runner_for(model: str) -> Callable[[Path], dict[str, float]]:
    """case.json's "model" -> the run_cases of the registered family that replays it."""
    from emo_stream import registry

    family = registry.parity_family(model)
    if family is None:
        known = ", ".join(sorted(registry.parity_models())) or "none"
        raise GoldenFormatError(f"no parity runner for model {model!r} (known: {known})")
    return family.parity_runner()


def run_parity(golden_dir: str | Path, only: list[str] | None = None) -> dict[str, float]:
    """{case: max abs error} for every case of the golden set in `golden_dir` (only: the case groups whose
    names are listed, for runners that support it)."""
    case = read_case(golden_dir)
    runner = runner_for(case["model"])
    kwargs = {}
    if only:
        import inspect

        if "only" not in inspect.signature(runner).parameters:
            raise GoldenFormatError(f"--case is not supported for model {case['model']!r}; run without it")
        kwargs["only"] = set(only)
    try:
        return runner(Path(golden_dir), **kwargs)
    except EmoStreamError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        # a case.json entry of the wrong type or shape: one line rather than a traceback (-v logs it)
        log.debug("parity runner failed", exc_info=True)
        raise GoldenFormatError(f"{golden_dir}: case.json or a reference file is not in the golden format "
                                f"({type(exc).__name__}: {exc})") from None


def failures(errors: dict[str, float], tolerance: float = TOLERANCE,
             grey_tolerance: float = GREY_TOLERANCE) -> list[str]:
    """Cases above their tolerance: GreyLevels errors against `grey_tolerance`, the rest against `tolerance`
    (NaN counts as a failure)."""
    def limit(v: float) -> float:
        return grey_tolerance if isinstance(v, GreyLevels) else tolerance

    return [k for k, v in errors.items() if not (math.isfinite(v) and v <= limit(v))]


# ---- CLI ---------------------------------------------------------------------------------------------
EPILOG = """\
Every case section case.json lists is replayed (a set may leave any of them out); sizes, file names, seeds,
boxes, windows, steps and guidance all come from case.json and the weight files, so any folder in the
golden format works, not only the shared ones.

exit status:
  0  every case within the tolerance
  1  some case above its tolerance (floats: --tolerance; uint8 pictures, named "(grey levels)":
     --grey-tolerance) or NaN; the JSON is printed and stderr names the cases
  2  not a golden set or broken files: one line on stderr naming the folder or file (and the key and shape
     for weights), e.g. no case.json, an unknown "model", a listed output file or tensor missing, weights
     missing or of another size
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("golden_dir", metavar="GOLDEN_DIR", help="a golden set folder (with case.json)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"max abs error allowed per case (default {TOLERANCE:g})")
    parser.add_argument("--grey-tolerance", type=float, default=GREY_TOLERANCE,
                        help=f"max error allowed for uint8 picture cases, in grey levels (default {GREY_TOLERANCE:g})")
    parser.add_argument("--case", action="append", metavar="NAME",
                        help="replay only this case group (repeatable; e.g. denoiser_single, acc_loop)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as the golden sets were made)")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    errors = run_parity(args.golden_dir, args.case)
    print(json.dumps(errors, indent=1))
    bad = failures(errors, args.tolerance, args.grey_tolerance)
    if bad:
        limits = f"{args.tolerance:g}" + (f" (pictures: {args.grey_tolerance:g} grey levels)"
                                          if any(isinstance(errors[k], GreyLevels) for k in bad) else "")
        print(f"emo-stream parity: {len(bad)} case(s) above {limits}: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
