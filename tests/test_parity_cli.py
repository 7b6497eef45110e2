"""`emo-stream parity` and the model-family registry, independent of any one family: bad folders are one
line (exit 2), errors above the tolerance exit 1, and checkpoints dispatch on their architecture key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from emo_stream import parity
from emo_stream.errors import WeightsError
from emo_stream import registry
from server.cli import main as cli_main


def _cli(capsys, *argv):
    rc = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, [l for l in out.err.splitlines() if l.strip()]


def fake_runner(golden_dir: Path) -> dict[str, float]:
    return json.loads((golden_dir / "errors.json").read_text())


@pytest.fixture
def fake_set(tmp_path):
    registry.register_family(registry.Family(name="fake", title="Fake", backend=f"{__name__}:fake_runner",
                                             parity=f"{__name__}:fake_runner", parity_models=("fake-model",)))
    (tmp_path / "case.json").write_text(json.dumps({"model": "fake-model"}))
    yield tmp_path
    registry.unregister_family("fake")


@pytest.mark.parametrize("errors,rc", [({"a": 0.0, "b": 9e-5}, 0), ({"a": 0.0, "b": 2e-4}, 1),
                                        ({"a": math.nan}, 1)])
def test_parity_prints_json_and_fails_above_tolerance(fake_set, capsys, errors, rc):
    (fake_set / "errors.json").write_text(json.dumps(errors))
    code, out, err = _cli(capsys, "parity", fake_set)
    assert code == rc
    assert json.loads(out).keys() == errors.keys()
    if rc:
        assert "above" in err[-1]


def test_parity_tolerance_option(fake_set, capsys):
    (fake_set / "errors.json").write_text(json.dumps({"a": 2e-4}))
    assert _cli(capsys, "parity", fake_set, "--tolerance", "1e-3")[0] == 0


@pytest.mark.parametrize("content,words", [(None, ["no case.json"]), ("{not json", ["not valid JSON"]),
                                           ("[1]", ["expected a JSON object"]), ('{"x": 1}', ['"model"']),
                                           ('{"model": "nope"}', ["no parity runner", "nope"])])
def test_parity_bad_folder_is_one_line(tmp_path, capsys, content, words):
    if content is not None:
        (tmp_path / "case.json").write_text(content)
    code, out, err = _cli(capsys, "parity", tmp_path)
    assert code == 2 and len(err) == 1 and err[0].startswith("emo-stream parity: error:"), err
    assert all(w in err[0] for w in words), err


def test_parity_missing_folder(tmp_path, capsys):
    code, _, err = _cli(capsys, "parity", tmp_path / "absent")
    assert code == 2 and "not found" in err[-1]
    (tmp_path / "case.json").write_text("{}")
    code, _, err = _cli(capsys, "parity", tmp_path / "case.json")     # the file instead of its folder
    assert code == 2 and len(err) == 1 and "is a file, not a golden set folder" in err[0], err


def test_checkpoint_architecture_key(tmp_path):
    assert registry.checkpoint_architecture(tmp_path) is None            # not a checkpoint
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "old"}))
    assert registry.checkpoint_architecture(tmp_path) == "emo"           # written before the key existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"architecture": "martian"}))
    with pytest.raises(WeightsError, match="unknown model architecture 'martian'"):
        registry.family_of(tmp_path)


def test_unknown_folder_names_known_families(tmp_path):
    with pytest.raises(WeightsError, match="not an emo-stream checkpoint"):
        registry.family_of(tmp_path)


def test_emo_checkpoint_roundtrip_keeps_architecture(tmp_path):
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.emo.model import EmoModel

    assert load_config("tiny").architecture == "emo"
    model = EmoModel.build("tiny")
    model.save_pretrained(tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["architecture"] == "emo"
    family, found = registry.family_of(tmp_path)
    assert family.name == "emo" and "EMO checkpoint" in found
    loaded = registry.load_model(tmp_path)
    assert isinstance(loaded, EmoModel)


def test_convert_unknown_folder_is_one_line(tmp_path, capsys):
    code, _, err = _cli(capsys, "convert", tmp_path, "--out", tmp_path / "ckpt")
    assert code == 2 and len(err) == 1 and "not an emo-stream checkpoint" in err[0], err


def test_emo_checkpoint_carries_its_noise_schedule(tmp_path):
    """The schedule is saved with the model; sampling and training read it (defaults: SD1.5 epsilon)."""
    import torch

    from emo_stream.families.emo.backend import EmoBackend
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.emo.model import EmoModel
    from emo_stream.training.model_adapter import TrainingModule

    cfg = load_config("tiny")
    assert (cfg.noise.prediction_type, cfg.noise.beta_schedule, cfg.uncond_drops) == ("epsilon", "scaled_linear",
                                                                                      ["audio"])
    cfg.noise.prediction_type, cfg.noise.rescale_betas_zero_snr = "v_prediction", True
    EmoModel.build(cfg).save_pretrained(tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["noise"]["prediction_type"] == "v_prediction" and saved["noise"]["rescale_betas_zero_snr"]
    model = registry.load_model(tmp_path)
    backend = EmoBackend(model, size=64, steps=2)
    assert backend._scheduler().config.prediction_type == "v_prediction"
    assert float(backend._scheduler().alphas_cumprod[-1]) == 0.0          # zero terminal SNR
    module = TrainingModule(model, stage=1)
    assert module.prediction_type == "v_prediction" and float(module.alphas_cumprod[-1]) == 0.0
    bad = load_config("tiny").to_dict()
    bad["noise"]["prediction_type"] = "sample"
    from emo_stream.errors import ConfigError
    from emo_stream.families.emo.config import config_from_dict

    with pytest.raises(ConfigError, match="prediction_type"):
        config_from_dict(bad)
    assert torch.is_tensor(module.alphas_cumprod)
