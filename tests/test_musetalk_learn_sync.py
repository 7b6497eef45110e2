"""bench/learn_musetalk_sync.py's pieces, fast: the synthetic faces' landmarks put the whole mouth in the crop's
blanked lower half (else training could read the answer from the masked input), and a few steps of its
MuseTalk objective reduce the loss. The full proof (minutes) is the bench script itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("learn_musetalk_sync_bench", BENCH / "learn_musetalk_sync.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_the_mouth_lies_in_the_blanked_half_of_the_crop(bench, index):
    from emo_stream.training.synthetic import FACE_CENTER, FACE_RADII, draw_face, random_identity

    rng = np.random.default_rng(0)
    ident = [random_identity(rng) for _ in range(index + 1)][index]
    rx, ry = FACE_RADII[0] * ident.face_scale, FACE_RADII[1] * ident.face_scale
    box = np.array([FACE_CENTER[0] - rx, FACE_CENTER[1] - ry, FACE_CENTER[0] + rx, FACE_CENTER[1] + ry]) * 64
    closed, wide = (bench.crop_of(draw_face(ident, 64, mouth=m, eyes=1.0), box, 64, 2).astype(int)
                    for m in (0.0, 1.0))
    diff = np.abs(closed - wide).max(axis=(1, 2))           # per crop row
    assert diff[32:].max() > 100                              # the mouth opens in the lower half ...
    assert diff[:32].max() <= 2                               # ... and nothing of it shows above


def test_a_few_steps_of_the_objective_reduce_the_loss(bench):
    from diffusers import UNet2DConditionModel

    from emo_stream.families.musetalk.testing import TINY_UNET

    torch.manual_seed(0)
    model = SimpleNamespace(unet=UNet2DConditionModel(**TINY_UNET), with_positions=lambda a: a)
    g = torch.Generator().manual_seed(1)
    clip = {"masked": torch.randn(2, 4, 8, 8, generator=g), "whole": torch.randn(2, 4, 8, 8, generator=g),
            "audio": torch.randn(2, 6, 384, generator=g)}
    run = bench.train_unet(model, [clip], seconds=1e9, batch_size=2, lr=2e-3, seed=0, max_steps=8)
    assert run["steps"] == 8
    assert np.mean(run["losses"][-2:]) < 0.8 * np.mean(run["losses"][:2])
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
