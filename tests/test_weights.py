"""Weights: init from pretrained folders (built here from random tiny models), checkpoints, clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, AutoencoderTiny, MotionAdapter, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2Config, Wav2Vec2Model

from emo_stream.backend import SegmentJob
from emo_stream.families.emo.backend import EmoBackend, load_model
from emo_stream.errors import ConfigError, WeightsError
from emo_stream.families.emo.config import load_config
from emo_stream.families.emo.from_folders import init_from_folders
from emo_stream.families.emo.model import EmoModel
from emo_stream.families.emo.testing import liven_new_layers

CFG = load_config("tiny")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A diffusers SD folder (unet/, vae/), a wav2vec2 folder, a MotionAdapter and a TAESD folder."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1)
    UNet2DConditionModel(**CFG.unet).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(**CFG.vae).save_pretrained(root / "sd" / "vae")
    Wav2Vec2Model(Wav2Vec2Config(**CFG.wav2vec2)).save_pretrained(root / "w2v")
    MotionAdapter(**CFG.motion_adapter).save_pretrained(root / "motion")
    AutoencoderTiny(**CFG.taesd).save_pretrained(root / "taesd")
    return root


def test_init_from_folders_loads_every_part(folders, caplog):
    with caplog.at_level(logging.INFO, logger="emo_stream.families.emo"):
        model = init_from_folders("tiny", sd15=folders / "sd", wav2vec2=folders / "w2v",
                                  motion_adapter=folders / "motion", taesd=folders / "taesd")
    unet = load_file(folders / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    ref = model.reference_net.unet.state_dict()
    assert set(ref) == set(unet) and all(torch.equal(ref[k], unet[k]) for k in unet)
    bb = model.backbone.unet.state_dict()
    assert all(torch.equal(bb[k], unet[k]) for k in unet)  # every 2D key kept its SD weights
    motion = load_file(folders / "motion" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(bb[k], v) for k, v in motion.items())
    vae = load_file(folders / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in vae.items())
    taesd = load_file(folders / "taesd" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(model.taesd.state_dict()[k], v) for k, v in taesd.items())
    w2v = Wav2Vec2Model.from_pretrained(folders / "w2v")
    assert torch.equal(model.audio_encoder.wav2vec2.encoder.layers[0].attention.q_proj.weight,
                       w2v.encoder.layers[0].attention.q_proj.weight)
    logged = caplog.text
    for part in ("audio_proj", "speed_encoder", "face_locator", "audio-attention", "speed-attention"):
        assert f"newly initialised: {part}" in logged or part in logged
    assert "temporal modules" not in logged  # the adapter provided them


def test_init_yaml_through_the_backend(folders, tmp_path):
    spec = tmp_path / "init.yaml"
    spec.write_text(yaml.safe_dump({"preset": "tiny", "sd15": str(folders / "sd"), "wav2vec2": str(folders / "w2v"),
                                    "motion_adapter": str(folders / "motion"), "vae": str(folders / "sd" / "vae")}))
    backend = EmoBackend.load(str(spec), size=64, steps=1)
    assert backend.model.taesd is not None and backend.steps == 1
    spec.write_text(yaml.safe_dump({"sd15": "a", "wav2vec2": "b", "text_encoder": "c"}))
    with pytest.raises(ConfigError, match="text_encoder"):
        EmoBackend.load(str(spec), size=64)


def test_wrong_and_missing_folders(folders, tmp_path):
    with pytest.raises(WeightsError, match="SD1.5 folder not found"):
        init_from_folders("tiny", sd15=tmp_path / "nope", wav2vec2=folders / "w2v")
    with pytest.raises(WeightsError, match="no weights file"):  # wav2vec2 folder given as SD
        init_from_folders("tiny", sd15=folders / "w2v", wav2vec2=folders / "w2v")
    with pytest.raises(WeightsError, match="missing|unexpected"):  # VAE weights where the UNet should be
        init_from_folders("tiny", sd15=folders / "sd" / "vae", wav2vec2=folders / "w2v")
    with pytest.raises(WeightsError, match="config.json"):
        init_from_folders("tiny", sd15=folders / "sd", wav2vec2=folders / "sd")
    with pytest.raises(WeightsError, match="model not found"):
        EmoBackend.load(str(tmp_path / "missing-model"), size=64)


def test_shape_mismatch_names_file_key_and_shapes(folders, tmp_path):
    bigger = dict(CFG.unet, cross_attention_dim=48)
    torch.manual_seed(0)
    UNet2DConditionModel(**bigger).save_pretrained(tmp_path / "sd" / "unet")
    with pytest.raises(WeightsError) as err:
        init_from_folders("tiny", sd15=tmp_path / "sd", wav2vec2=folders / "w2v")
    msg = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in msg and "attn2.to_k.weight" in msg
    assert "(32, 48)" in msg and "(32, 32)" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def live_model():
    torch.manual_seed(3)
    return liven_new_layers(EmoModel.build("tiny").eval())


def _render(model: EmoModel) -> np.ndarray:
    backend = EmoBackend(model, size=64, steps=2)
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    avatar = backend.avatar_from_crop(img, np.array([16, 16, 48, 48]))
    audio = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    feats = backend.encode_audio(audio, 6400, 6)
    return backend.generate([SegmentJob(avatar, backend.new_state(avatar, 5), feats, 6)])[0]


def test_checkpoint_round_trip_is_identical(live_model, tmp_path):
    live_model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.yaml").is_file() and (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = EmoModel.from_pretrained(tmp_path / "ckpt")
    a, b = live_model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(_render(live_model), _render(loaded))
    via_backend = load_model(str(tmp_path / "ckpt")).state_dict()  # what `--model DIR` loads
    assert all(torch.equal(via_backend[k], a[k]) for k in a)


def test_checkpoint_errors(live_model, tmp_path):
    ckpt = live_model.save_pretrained(tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "other.safetensors")
    with pytest.raises(WeightsError, match="model.safetensors"):
        EmoModel.from_pretrained(ckpt)
    state = load_file(ckpt / "other.safetensors")
    key = "face_locator.out.weight"
    state[key] = torch.zeros(3, *state[key].shape[1:])
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(WeightsError, match=r"face_locator\.out\.weight.*\(3, 16, 3, 3\).*\(4, 16, 3, 3\)"):
        EmoModel.from_pretrained(ckpt)
    with pytest.raises(WeightsError, match="config.yaml is missing"):
        EmoModel.from_pretrained(tmp_path)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["sampling"]["steps"] = 0
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="steps"):
        EmoModel.from_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg["sampling"]["steps"] = 2
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(WeightsError, match="cannot read weights file"):
        EmoModel.from_pretrained(ckpt)
