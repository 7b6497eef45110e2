"""bf16 and fp16 against fp32 for every family's per-step denoiser, on the CPU at the tiny test sizes.

    python bench/dtypes.py [--json bench/results/dtypes-cpu.json]

For each family (tests/family_cases.py: tiny random weights, every layer live) and each low dtype: one denoiser
call on the same weights and inputs as the fp32 one, max |low - fp32| / max |fp32| and the mean relative error,
and whether one whole segment loop stays finite. The GPU's kernels round differently (tensor cores accumulate
in fp32): these figures say the models are dtype-clean, not what a GPU's error will be.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import device_name, emit_json  # bench/; puts the repo on sys.path


def measure(family: str) -> list[dict]:
    from tests.family_cases import CASES

    case = CASES[family]
    fp32_model = case.model()
    sessions = 2 if case.batched else 1
    ref = case.backend(dtype=torch.float32, model=fp32_model)
    fn, x, t = case.step(ref, case.jobs(ref, sessions=sessions))
    with torch.no_grad():
        want = fn(x, t).float()
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        low = case.backend(dtype=dtype, model=fp32_model)
        jobs = case.jobs(low, sessions=sessions)
        fn, x, t = case.step(low, jobs)
        t0 = time.perf_counter()
        with torch.no_grad():
            got = fn(x, t).float()
            seg = case.run_segment(low, jobs)
        diff = (got - want).abs()
        finite = all(np.isfinite(o.float().numpy() if isinstance(o, torch.Tensor) else o).all() for o in seg)
        out.append({"family": family, "dtype": str(dtype).replace("torch.", ""),
                    "step_max_rel_error": float(f"{float(diff.max() / want.abs().max()):.3g}"),
                    "step_mean_rel_error": float(f"{float(diff.mean() / want.abs().mean()):.3g}"),
                    "step_finite": bool(torch.isfinite(got).all()), "segment_finite": bool(finite),
                    "seconds": round(time.perf_counter() - t0, 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    from tests.family_cases import CASES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(sorted(CASES)))
    p.add_argument("--json", default=None, help="also write the result here (e.g. bench/results/dtypes-cpu.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    records = []
    for family in args.families.split(","):
        records += measure(family)
    emit_json({"bench": "dtypes", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
               "reference": "float32, same weights and inputs", "records": records}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
