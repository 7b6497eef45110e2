"""The EMO family's FLOP counter (emo_stream/families/emo/flops.py, run by bench/flops.py) on the tiny preset
(meta device, seconds): the record's fields, guidance doubling the denoising, the exact shortcuts costing less,
the parts summing to the total; and every registered model family declaring a counter."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def flops():
    from emo_stream.families.emo import flops

    return flops


def test_every_model_backend_has_a_counter():
    from emo_stream.registry import families

    assert [f.name for f in families() if f.architecture and f.backend and not f.flops] == []


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
