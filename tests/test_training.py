"""Training smoke tests on a tiny synthetic set: losses fall, resume is exact, stage 3 trains only temporal
and speed parameters, the final checkpoint is a model `generate` loads, and bad configs fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo_stream.errors import ConfigError
from emo_stream.training import model_adapter as ma
from emo_stream.training.config import config_from_dict, load_train_config
from emo_stream.training.data import EmoDataset
from emo_stream.training.synthetic import generate_dataset
from emo_stream.training.train import Trainer, train

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, clips=3, size=SIZE, seconds=1.2, identities=2, seed=1)
    return root


def cfg(synth, out, stage, **train):
    base = {"output_dir": str(out), "max_steps": 4, "batch_size": 1, "lr": 1e-3, "checkpoint_every": 2,
            "log_every": 1}
    base.update(train)
    return config_from_dict({"stage": stage, "model": {"init": "tiny"}, "data": {"root": str(synth)},
                             "train": base}, source="test")


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_goes_down_on_a_repeated_batch(synth, stage):
    torch.manual_seed(0)
    model = ma.load_model("tiny")
    model.set_trainable(["referencenet", "backbone", "face_locator"] if stage == 1 else
                        ["temporal", "audio", "backbone"])
    module = ma.TrainingModule(model, stage).train()
    ds = EmoDataset([synth], SIZE, "image" if stage == 1 else "video", clip_frames=6, motion_frames=2,
                    audio_left_frames=4, audio_right_frames=2)
    batch = torch.utils.data.default_collate([ds[(0, 1)], ds[(1, 2)]])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(10):
        loss = module(batch, generator=torch.Generator().manual_seed(0))  # same noise and timestep each time
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_resumes_exactly(synth, tmp_path):
    # uninterrupted: 4 steps (stage 2, EMA on, gradient accumulation 2)
    extra = dict(ema_decay=0.9, grad_accum=2, sample_every=0)
    full = train(cfg(synth, tmp_path / "full", 2, **extra), resume=None, progress=False)
    # interrupted after 2 steps, then resumed to 4 in a fresh trainer
    part = train(cfg(synth, tmp_path / "part", 2, max_steps=2, **extra), resume=None, progress=False)
    rest = train(cfg(synth, tmp_path / "part", 2, **extra), resume="auto", progress=False)
    assert part["steps"] == 2 and rest["steps"] == 4
    assert np.allclose(full["losses"], part["losses"] + rest["losses"], rtol=1e-5, atol=1e-7)
    from emo_stream.families.emo.model import EmoModel

    a = EmoModel.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = EmoModel.from_pretrained(tmp_path / "part" / "final").state_dict()
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5
    lines = (tmp_path / "part" / "loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and [int(x.split(",")[0]) for x in lines[1:]] == [1, 2, 3, 4]


def test_stage1_writes_samples_and_a_model_generate_loads(synth, tmp_path, speech_wav, portrait_path):
    res = train(cfg(synth, tmp_path / "s1", 1, max_steps=2, sample_every=2, sample_steps=1, vae_steps=3,
                    vae_batch_size=2), resume=None, progress=False)
    assert res["losses"] and all(np.isfinite(res["losses"]))
    from emo_stream.media import probe_durations

    sample = tmp_path / "s1" / "samples" / "step-000002.mp4"
    assert probe_durations(sample)["frames"] > 0
    # the final folder is an ordinary EMO checkpoint: generate loads it (a real portrait, real face detection)
    from emo_stream.registry import create_backend
    from emo_stream.generate import generate_file

    backend = create_backend("emo", res["final"], size=SIZE, steps=1, device="cpu")
    assert backend.model.vae.config.scaling_factor != pytest.approx(0.18215)  # the fitted VAE's own scale
    out = generate_file(backend, portrait_path, speech_wav, tmp_path / "gen.mp4", progress=False)
    d = probe_durations(out["out"])
    assert abs(d["video_s"] - d["audio_s"]) < 0.1


def test_stage3_trains_only_temporal_and_speed(synth, tmp_path):
    # 3 steps: fresh temporal modules and speed attention have zero output projections, so gradients
    # reach the speed encoder only once those have moved
    trainer = Trainer(cfg(synth, tmp_path / "s3", 3, max_steps=3), resume=None, progress=False)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.run()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])}
    groups = {trainer.model.parameter_group(k) for k in changed}
    assert groups == {"temporal", "speed"}, groups
    assert any(k.startswith("speed_encoder.") for k in changed)
    assert trainer.trainable_groups == ["speed", "temporal"]


def test_gradient_checkpointing_gives_the_same_gradients(synth):
    ds = EmoDataset([synth], SIZE, "video", clip_frames=4, motion_frames=2, audio_left_frames=2)
    batch = torch.utils.data.default_collate([ds[(0, 3)]])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ma.load_model("tiny")
        model.set_trainable(["temporal", "audio", "backbone"])
        if ckpt:
            ma.enable_gradient_checkpointing(model)
        module = ma.TrainingModule(model, 2).train()
        module(batch, generator=torch.Generator().manual_seed(0)).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_clear_config_errors(synth, tmp_path):
    with pytest.raises(ConfigError, match="data.root is missing"):
        config_from_dict({"stage": 1, "train": {}})
    with pytest.raises(ConfigError, match="unknown keys in 'train'"):
        config_from_dict({"data": {"root": "x"}, "train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="stage must be 1, 2, 3 or distill"):
        config_from_dict({"stage": 4, "data": {"root": "x"}})
    with pytest.raises(ConfigError, match="unknown trainable groups"):
        config_from_dict({"data": {"root": "x"}, "train": {"trainable": ["everything"]}})
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="dataset folder not found"):
        Trainer(config_from_dict({"data": {"root": str(tmp_path / "nodata")},
                                  "train": {"output_dir": str(tmp_path / "o")}}), resume=None)
    # a stage-2 run cannot resume a stage-1 checkpoint folder
    train(cfg(synth, tmp_path / "o1", 1, max_steps=1), resume=None, progress=False)
    with pytest.raises(ConfigError, match="stage 1, not stage 2"):
        Trainer(cfg(synth, tmp_path / "o1", 2), resume="auto")


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/train/*.yaml")):
        c = load_train_config(path)
        stage = path.stem.rsplit("_", 1)[-1].removeprefix("stage")
        assert str(c.stage) == stage and c.trainable


def test_cli_reports_config_errors_and_exits_2(tmp_path, capsys):
    from server.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\ndata: {root: nowhere}\ntrain: {lr: fast}\n")
    assert main(["train", "--stage", "1", "--config", str(bad)]) == 2
    assert "train.lr is not a number" in capsys.readouterr().err
    assert main(["train", "--stage", "2", "--config", str(bad.with_name("missing.yaml"))]) == 2
