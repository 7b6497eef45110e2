"""EMO model structure and conditioning paths (tiny preset, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from emo_stream.errors import ConfigError
from emo_stream.families.emo.config import load_config
from emo_stream.families.emo.model import EmoModel
from emo_stream.families.emo.config import config_from_dict
from emo_stream.families.emo.testing import liven_new_layers

B, F, N = 2, 6, 4


@pytest.fixture(scope="module")
def model() -> EmoModel:
    torch.manual_seed(0)
    return EmoModel.build("tiny").eval()


@pytest.fixture(scope="module")
def live_model() -> EmoModel:
    torch.manual_seed(0)
    return liven_new_layers(EmoModel.build("tiny").eval())


def _inputs(model: EmoModel, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    k = 2 * cfg.audio.window + 1
    return dict(
        noisy=torch.randn(B, 4, F, 8, 8, generator=g),
        t=torch.tensor([700, 300]),
        ref=torch.randn(B, 4, 8, 8, generator=g),
        audio=torch.randn(B, F, k, cfg.audio_feature_dim, generator=g),
        mask=torch.zeros(B, 1, 64, 64).index_fill_(2, torch.arange(16, 48), 1.0),
        speed=torch.full((B, F), 1.0),
        motion=torch.randn(B, 4, N, 8, 8, generator=g),
    )


def _forward(model: EmoModel, x: dict, **changes) -> torch.Tensor:
    x = {**x, **changes}
    with torch.no_grad():
        return model(x["noisy"], x["t"], x["ref"], x["audio"], x["mask"], x["speed"], x["motion"])


def test_presets_load_and_validate():
    tiny, sd15 = load_config("tiny"), load_config("sd15")
    assert tiny.unet["down_block_types"] and sd15.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd15.audio_feature_dim == 768 * 12 and sd15.clip_frames == 12 and sd15.motion_frames == 4
    assert tiny.size_multiple == 16 and sd15.latent_factor == 8


@pytest.mark.parametrize("change, words", [
    ({"unknown_key": 1}, "unknown keys"),
    ({"motion_adapter": {"block_out_channels": [1, 2]}}, "motion_adapter.block_out_channels"),
    ({"clip_frames": 40}, "motion_max_seq_length"),
    ({"sampling": {"decoder": "jpeg"}}, "decoder"),
    ({"face_locator": {"channels": [8]}}, "face_locator.channels"),
])
def test_bad_config_is_a_config_error(change, words):
    data = load_config("tiny").to_dict()
    for key, value in change.items():  # sections are merged, scalars replaced
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        config_from_dict(data, "test")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "unet": {}}))
    with pytest.raises(ConfigError):
        load_config(bad)


def test_forward_shapes_and_zero_init_keeps_pretrained_behaviour(model):
    x = _inputs(model)
    out = _forward(model, x)
    assert out.shape == (B, 4, F, 8, 8) and torch.isfinite(out).all()
    # new layers start at zero: audio, speed, face mask and (fresh temporal modules) motion frames are ignored
    for change in ({"audio": torch.zeros_like(x["audio"])}, {"speed": torch.full((B, F), 7.0)},
                   {"mask": torch.ones_like(x["mask"])}, {"motion": -x["motion"]}):
        assert torch.allclose(_forward(model, x, **change), out, atol=1e-5), change.keys()
    # the reference is pretrained conditioning: it matters from step 0
    assert not torch.allclose(_forward(model, x, ref=-x["ref"]), out, atol=1e-4)


@pytest.mark.parametrize("name", ["audio", "speed", "mask", "motion", "ref"])
def test_every_conditioning_path_is_live(live_model, name):
    x = _inputs(live_model)
    out = _forward(live_model, x)
    changed = {"audio": x["audio"] * 0, "speed": torch.full((B, F), 7.0), "mask": torch.ones_like(x["mask"]),
               "motion": torch.randn_like(x["motion"]), "ref": -x["ref"]}[name]
    diff = (_forward(live_model, x, **{name: changed}) - out).abs().max().item()
    assert diff > 1e-4, f"{name} does not reach the output"


def test_motion_frames_are_per_sample(live_model):
    """Changing sample 0's motion frames changes sample 0's prediction only (batch rows stay separate)."""
    x = _inputs(live_model)
    out = _forward(live_model, x)
    motion = x["motion"].clone()
    motion[0] = torch.randn_like(motion[0])
    out2 = _forward(live_model, x, motion=motion)
    assert (out2[0] - out[0]).abs().max() > 1e-4
    assert torch.allclose(out2[1], out[1], atol=1e-5)


def test_audio_of_a_frame_reaches_mainly_that_frame(live_model):
    x = _inputs(live_model)
    out = _forward(live_model, x)
    audio = x["audio"].clone()
    audio[:, 3] = torch.randn_like(audio[:, 3])
    diff = (_forward(live_model, x, audio=audio) - out).abs().amax(dim=(0, 1, 3, 4))
    # spatial layers see one frame's tokens; only the temporal modules spread it to neighbours
    assert diff[3] > 1e-4 and diff[3] >= diff.max() * 0.5


def test_training_forward_backward(live_model):
    x = _inputs(live_model)
    live_model.train()
    try:
        pred = live_model(x["noisy"], x["t"], x["ref"], x["audio"], x["mask"], x["speed"], x["motion"],
                          drop_audio=torch.tensor([True, False]))
        loss = torch.nn.functional.mse_loss(pred, torch.randn_like(pred))
        loss.backward()
    finally:
        live_model.eval()
    grads = {name: p.grad for name, p in live_model.named_parameters() if p.requires_grad}
    for part in ("audio_proj.", "speed_encoder.", "face_locator.", "reference_net.", "backbone."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
    assert all(p.grad is None for p in live_model.audio_encoder.parameters())  # wav2vec2 is frozen
    live_model.zero_grad(set_to_none=True)


def test_audio_encoder_returns_exact_frames(model):
    enc = model.audio_encoder
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    for start, frames in ((0, 1), (6400, 12), (6400, 5)):
        feats = enc.encode(audio, start, frames, fps=25)
        assert feats.shape == (frames, 2 * model.config.audio.window + 1, model.config.audio_feature_dim)
    # each frame's +-m window: frame k's centre column is frame k+1's previous column
    feats = enc.encode(audio, 6400, 6, fps=25)
    m = model.config.audio.window
    assert torch.allclose(feats[1:, m], feats[:-1, m + 1])
    # the features follow the audio: a different segment gives different features
    assert not torch.allclose(enc.encode(audio, 0, 6, fps=25), feats)


def test_speed_from_head_poses():
    from emo_stream.families.emo.speed import rotation_speed, speed_buckets

    poses = np.zeros((5, 3), np.float32)
    poses[:, 0] = np.deg2rad([0, 2, 4, 4, 4])  # yaw turning 2 deg/frame, then still
    speed = rotation_speed(poses)
    assert torch.allclose(speed, torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0]), atol=1e-4)
    codes = speed_buckets(speed, torch.tensor([0.0, 2.0, 4.0]), torch.tensor([0.5, 0.5, 0.5]))
    assert codes.shape == (5, 3) and codes[0, 0] > 0.99 and abs(codes[0, 1]) < 1e-3 and codes[0, 2] < -0.99


def test_training_stages_select_the_right_parts():
    # the stages' default groups are training's (emo_stream.training.config.STAGE_TRAINABLE)
    from emo_stream.training.config import STAGE_TRAINABLE

    torch.manual_seed(0)
    m = EmoModel.build("tiny")
    try:
        counts = {}
        for stage in (1, 2, 3):
            chosen = m.set_trainable(STAGE_TRAINABLE[stage])
            assert set(chosen) == {n for n, p in m.named_parameters() if p.requires_grad}
            counts[stage] = {EmoModel.parameter_group(n) for n, p in m.named_parameters() if p.requires_grad}
        assert counts[1] == {"referencenet", "backbone", "face_locator"}
        assert counts[2] == {"temporal", "audio"}
        assert counts[3] == {"temporal", "speed"}
        groups = {EmoModel.parameter_group(n) for n, _ in m.named_parameters()}
        assert groups == set(EmoModel.PARAMETER_GROUPS) | {"frozen"}
        # EMO's new cross-attentions: audio in the spatial blocks, speed in the temporal modules
        named = dict(m.named_parameters())
        assert {EmoModel.parameter_group(n) for n in named if ".attn2.processor." in n} == {"audio", "speed"}
        assert all(EmoModel.parameter_group(n) == "frozen" for n in named if n.startswith(("vae.", "audio_encoder.")))
        with pytest.raises(ValueError, match="unknown parameter groups"):
            m.set_trainable(["everything"])
    finally:
        m.requires_grad_(False)
