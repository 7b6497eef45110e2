"""The distill stage (emo_stream/training/distill.py): the target is exact (a student equal to the teacher at
ratio 1 without guidance has zero loss), the loss falls on a repeated batch, block-pruned students copy the
teacher's weights by shape, and `train --stage distill` writes a guidance-free few-step model that runs."""

from __future__ import annotations

import json

import pytest
import torch

from emo_stream.errors import ConfigError
from emo_stream.training import distill
from emo_stream.training import model_adapter as ma
from emo_stream.training.config import config_from_dict
from emo_stream.training.data import EmoDataset
from emo_stream.training.synthetic import generate_dataset

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, clips=2, size=SIZE, seconds=1.0, identities=1, seed=1)
    return root


@pytest.fixture(scope="module")
def batch(synth):
    ds = EmoDataset([synth], SIZE, "video", clip_frames=4, motion_frames=4, audio_left_frames=4, audio_right_frames=2)
    return torch.utils.data.default_collate([ds[(0, 1)], ds[(1, 2)]])


def test_timesteps_match_the_backend_sampler():
    assert distill.ddim_timesteps(4) == [999, 749, 499, 249, -1]
    teacher = distill.ddim_timesteps(40)
    assert teacher[:2] == [999, 974] and teacher[-2:] == [24, -1] and set(distill.ddim_timesteps(4)) <= set(teacher)


def test_target_is_exact_for_a_student_equal_to_its_teacher(batch):
    """Ratio 1, no guidance, student = teacher: the target noise is the teacher's own prediction."""
    teacher = ma.load_model("tiny")
    student = distill.init_student(teacher, None, 4)
    module = distill.DistillModule(student, teacher, steps=4, teacher_steps=4, guidance=1.0).eval()
    with torch.no_grad():
        loss = module(batch, generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8
    guided = distill.DistillModule(student, teacher, steps=4, teacher_steps=8, guidance=2.0).eval()
    with torch.no_grad():
        assert float(guided(batch, generator=torch.Generator().manual_seed(0))) > 1e-6  # a real target now


def test_loss_goes_down_and_student_is_guidance_free(batch):
    torch.manual_seed(0)
    teacher = ma.load_model("tiny")
    with torch.no_grad():  # a teacher whose audio matters, so guidance changes its sampler
        for name, p in teacher.named_parameters():
            if ".processor." in name:
                p.normal_(0, 0.2)
    student = distill.init_student(teacher, None, 2)
    assert student.config.sampling.guidance == 1.0 and student.config.sampling.steps == 2
    student.set_trainable(["backbone", "temporal", "audio"])
    module = distill.DistillModule(student, teacher, steps=2, teacher_steps=4, guidance=6.0).train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(8):
        loss = module(batch, generator=torch.Generator().manual_seed(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert not any(p.requires_grad for p in teacher.parameters())
    # the student's API: the backend samples it with one backbone pass per step (no guidance batch)
    from emo_stream.families.emo.backend import EmoBackend

    backend = EmoBackend(student.eval(), size=SIZE)
    assert backend.guidance == 1.0 and backend.steps == 2


def test_pruned_student_copies_the_teacher_by_shape():
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.emo.model import EmoModel

    cfg = load_config("tiny")
    cfg.unet["layers_per_block"] = cfg.motion_adapter["motion_layers_per_block"] = 2
    torch.manual_seed(0)
    teacher = EmoModel.build(cfg.validate()).eval()
    student = distill.init_student(teacher, 1, 4)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert len(s_state) < len(t_state)
    # up blocks keep their first and last layer (the last one takes the level's skip input)
    name = "backbone.unet.up_blocks.1.resnets.1.conv1.weight"
    assert torch.equal(s_state[name], t_state["backbone.unet.up_blocks.1.resnets.2.conv1.weight"])
    name = "reference_net.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(s_state[name], t_state[name])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = student.encode_reference(x)
        cond = student.condition(ref, torch.zeros(1, 2, 5, student.config.audio_feature_dim), torch.ones(1, 1, 64, 64))
        assert student.predict_noise(torch.randn(1, 4, 2, 8, 8), torch.tensor([500]), cond).shape == (1, 4, 2, 8, 8)
    with pytest.raises(ConfigError, match="student_layers_per_block"):
        distill.init_student(teacher, 3, 4)


def test_train_stage_distill_end_to_end(synth, tmp_path):
    from emo_stream.families.emo.backend import load_model
    from emo_stream.training.train import train

    teacher_dir = ma.save_model(ma.load_model("tiny"), tmp_path / "teacher")
    cfg = config_from_dict({"stage": "distill", "distill": {"teacher": str(teacher_dir), "steps": 2, "teacher_steps": 4},
                            "data": {"root": str(synth), "clip_frames": 4},
                            "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 1,
                                      "lr": 1e-4, "checkpoint_every": 2, "log_every": 1}}, source="test")
    assert cfg.model.init == str(teacher_dir) and "referencenet" not in cfg.trainable
    result = train(cfg, resume=None, progress=False)
    assert result["steps"] == 2 and all(l == l for l in result["losses"])
    student = load_model(result["final"])
    assert student.config.sampling.guidance == 1.0 and student.config.sampling.steps == 2
    info = json.loads((tmp_path / "out" / "final" / "training.json").read_text())
    assert info["stage"] == "distill" and info["distilled"]["teacher_steps"] == 4


def test_distill_config_errors(synth):
    base = {"data": {"root": str(synth)}, "train": {"output_dir": "x"}}
    with pytest.raises(ConfigError, match="distill.teacher is missing"):
        config_from_dict({**base, "stage": "distill"}, source="t")
    with pytest.raises(ConfigError, match="multiple of distill.steps"):
        config_from_dict({**base, "stage": "distill", "distill": {"teacher": "tiny", "steps": 4, "teacher_steps": 10}},
                         source="t")
