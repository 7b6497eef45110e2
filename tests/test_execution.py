"""Execution options (emo_stream/execution.py) on the CPU: channels-last changes nothing but the layout,
compile falls back to eager (off on the CPU, and after any compiler failure), bf16 runs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from emo_stream.backend import SegmentJob
from emo_stream.families.emo.backend import EmoBackend
from emo_stream.errors import ConfigError
from emo_stream.execution import EagerFallback, ExecutionOptions, apply_execution
from emo_stream.families.emo.model import EmoModel
from emo_stream.families.emo.testing import liven_new_layers
from emo_stream.training.synthetic import identity_reference

SIZE = 32


def _frames(backend: EmoBackend, seed: int = 0) -> np.ndarray:
    image, box = identity_reference(SIZE, seed=0, index=0)
    avatar = backend.avatar_from_crop(image, box)
    state = backend.new_state(avatar, seed)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 5, backend.model.config.audio_feature_dim, generator=g)
    return backend.generate([SegmentJob(avatar=avatar, state=state, features=feats, num_frames=3)])[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return liven_new_layers(EmoModel.build("tiny").eval(), std=0.1)


def test_channels_last_gives_the_same_frames(model):
    plain = _frames(EmoBackend(model, size=SIZE, steps=2, guidance=1.0))
    backend = EmoBackend(model, size=SIZE, steps=2, guidance=1.0, channels_last=True)
    assert backend.execution["channels_last"] is True
    assert np.abs(_frames(backend).astype(int) - plain.astype(int)).max() <= 1
    model.to(memory_format=torch.contiguous_format)


def test_compile_is_off_on_the_cpu(model, caplog):
    with caplog.at_level(logging.WARNING, logger="emo_stream.execution"):
        backend = EmoBackend(model, size=SIZE, steps=1, guidance=1.0, compile="reduce-overhead")
    assert backend.execution["compile"] == "off" and "CUDA only" in caplog.text
    assert not isinstance(model.backbone.unet.forward, EagerFallback)
    with pytest.raises(ConfigError, match="compile must be one of"):
        apply_execution(model, ExecutionOptions(compile="fast"))


def test_a_failing_compiled_call_falls_back_to_eager_once(caplog):
    calls = []

    def broken(x):
        calls.append("compiled")
        raise RuntimeError("inductor exploded\nlong trace")

    f = EagerFallback(broken, lambda x: x + 1, "denoiser")
    with caplog.at_level(logging.WARNING, logger="emo_stream.execution"):
        assert f(1) == 2 and f(2) == 3
    assert calls == ["compiled"] and f.failed == "RuntimeError: inductor exploded"
    assert caplog.text.count("running it eagerly") == 1


def test_bf16_runs_on_the_cpu():
    backend = EmoBackend.load("tiny", size=SIZE, device="cpu", dtype="bf16", steps=1, guidance=1.0)
    assert backend.model.dtype == torch.bfloat16 and backend.execution["dtype"] == "bfloat16"
    frames = _frames(backend)
    assert frames.shape == (3, SIZE, SIZE, 3) and frames.dtype == np.uint8
