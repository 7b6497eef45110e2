"""bench/flops.py's counter on the tiny preset (meta device, seconds): the record's fields, guidance doubling
the denoising, the exact shortcuts costing less, the parts summing to the total."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def flops():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("flops_bench", BENCH / "flops.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_tiny_records(flops):
    guided = flops.count_emo("tiny", "live", steps=4, guidance=2.0, size=64, shortcuts=False, breakdown=True)
    free = flops.count_emo("tiny", "live", steps=4, guidance=1.0, size=64)
    for r in (guided, free):
        assert r["family"] == "emo" and r["mode"] == "live" and r["steps"] == 4 and r["segment_frames"] == 8
        assert set(r["parts"]) == {"reference", "motion", "audio", "condition", "denoise", "guidance", "decode"}
        assert r["tflop_per_frame_total"] == pytest.approx(sum(r["parts"].values()), rel=1e-3)
    assert guided["parts"]["guidance"] == guided["parts"]["denoise"] > 0 and free["parts"]["guidance"] == 0
    assert "temporal modules (incl. speed)" in guided["per_step_breakdown"]
    # exact shortcuts: fewer FLOPs per step, counted with full precision
    plain = flops.count_emo("tiny", "live", steps=1, guidance=1.0, size=64, shortcuts=False)
    fast = flops.count_emo("tiny", "live", steps=1, guidance=1.0, size=64, shortcuts=True)
    assert 0 < fast["parts"]["denoise"] < plain["parts"]["denoise"]
