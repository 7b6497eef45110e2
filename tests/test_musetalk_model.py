"""MuseTalk 1.5: exactness against MuseTalk's own outputs (../shared/golden/musetalk) through `emo-stream parity`,
perturbed weights that must fail, the download folder's detection, one-line errors for missing or foreign
files, and convert -> our checkpoint giving the same pictures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_stream.errors import WeightsError
from emo_stream.families.musetalk import loader, parity as mparity
from emo_stream.parity import GREY_TOLERANCE, TOLERANCE, GreyLevels, failures
from server.cli import main as cli_main
from tests.conftest import needs_shared_golden, shared_golden

pytestmark = pytest.mark.usefixtures("one_thread")
needs_golden = needs_shared_golden("musetalk")


@pytest.fixture(scope="module")
def golden() -> Path:
    return shared_golden("musetalk")


@pytest.fixture(scope="module")
def model(golden):
    torch.set_num_threads(1)
    return loader.load(golden / "weights")


@pytest.fixture(scope="module")
def case(golden):
    return json.loads((golden / "case.json").read_text())


@pytest.fixture(scope="module")
def tiny_download(tmp_path_factory) -> Path:
    """A generated MuseTalk models/ folder (random tiny weights, published formats): no ../shared needed."""
    from emo_stream.families.musetalk.testing import write_download

    torch.set_num_threads(1)
    return write_download(tmp_path_factory.mktemp("musetalk") / "models", seed=3)


# ---- exactness ----------------------------------------------------------------------------------------------
@needs_golden
def test_parity_command_passes_on_the_golden_set(golden, capsys):
    rc = cli_main(["parity", str(golden)])
    errors = json.loads(capsys.readouterr().out)
    assert rc == 0, errors
    groups = {k.split(".")[0] for k in errors}
    assert groups == {"audio", "avatar", "unet_decode", "blend"}
    grey = [k for k in errors if k.endswith("(grey levels)")]
    # every uint8 picture of the set is compared, and in grey levels: crops, decode, parsing, both blendings
    assert {"avatar.crops_bgr", "unet_decode.recon_bgr_uint8", "blend.parsing_jaw", "blend.offline_bgr",
            "blend.realtime_bgr", "blend.realtime_bgr_tensor_path"} <= {k.split(" ")[0] for k in grey}
    assert all(v <= GREY_TOLERANCE for k, v in errors.items() if k in grey)
    assert all(v <= TOLERANCE for k, v in errors.items() if k not in grey)


def test_grey_level_cases_get_their_own_tolerance():
    errors = {"a.float": 5e-5, "b.picture (grey levels)": GreyLevels(1.0), "c.picture (grey levels)": GreyLevels(2.0)}
    assert failures(errors) == ["c.picture (grey levels)"]
    assert failures(errors, tolerance=1e-5) == ["a.float", "c.picture (grey levels)"]
    assert failures(errors, grey_tolerance=2.0) == []
    assert failures({"x": GreyLevels(float("nan"))}) == ["x"]


@needs_golden
@pytest.mark.parametrize("part, group, case_name", [
    ("unet", "unet_decode", "unet_decode.pred_latents"),
    ("whisper", "audio", "audio.whisper_chunks"),
    ("vae", "avatar", "avatar.latent_means"),
    ("parser", "blend", "blend.parsing_jaw (grey levels)"),
])
def test_perturbed_weight_must_fail(model, golden, case, part, group, case_name):
    module = {"unet": model.unet, "whisper": model.whisper, "vae": model.vae.encoder,
              "parser": model.parser.net.conv_out if model.parser else None}[part]
    w = next(p for name, p in module.named_parameters() if p.ndim >= 2)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(0.05 * torch.randn_like(w) * w.std())
        errors = mparity.replay(model, golden, case, [group])
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert case_name in failures(errors), errors[case_name]
    assert not failures(mparity.replay(model, golden, case, [group]))   # restored: passes again


# ---- the download folder -------------------------------------------------------------------------------------
def test_detects_models_folder_and_its_parent(tiny_download):
    found = loader.detect(tiny_download)
    assert found and found.startswith("MuseTalk 1.5 download") and "MISSING" not in found
    assert loader.detect(tiny_download.parent) == found        # the checkout holding models/
    assert loader.detect(tiny_download / "sd-vae") is None


def test_registry_recognises_the_folder(tiny_download):
    from emo_stream.registry import family_of

    family, found = family_of(tiny_download)
    assert family.name == "musetalk" and "MuseTalk" in found


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("missing, named", [
    ("musetalkV15/unet.pth", None), ("musetalkV15/musetalk.json", None), ("sd-vae/config.json", None),
    ("sd-vae/diffusion_pytorch_model.bin", None), ("whisper/preprocessor_config.json", None),
    ("whisper/model.safetensors", "whisper/pytorch_model.bin"),   # the name MuseTalk's download uses
    ("face-parse-bisent/79999_iter.pth", None)])
def test_a_missing_file_is_one_line_naming_it(tiny_download, tmp_path, missing, named):
    root = _copy(tiny_download, tmp_path)
    (root / missing).unlink()
    with pytest.raises(WeightsError) as err:
        loader.load(root)
    msg = str(err.value)
    assert "\n" not in msg and str(root / (named or missing)) in msg, msg


@pytest.mark.parametrize("target, content, expect", [
    ("musetalkV15/unet.pth", "other_net", "unet.pth"),
    ("musetalkV15/unet.pth", "garbage", "unet.pth"),
    ("face-parse-bisent/79999_iter.pth", "other_net", "79999_iter.pth"),
    ("sd-vae/diffusion_pytorch_model.bin", "other_net", "diffusion_pytorch_model.bin"),
    ("musetalkV15/musetalk.json", "garbage", "musetalk.json"),
])
def test_a_foreign_file_is_one_line_naming_it(tiny_download, tmp_path, target, content, expect):
    root = _copy(tiny_download, tmp_path)
    path = root / target
    if content == "garbage":
        path.write_bytes(b"not weights at all")
    else:
        torch.save({"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, path)
    with pytest.raises(WeightsError) as err:
        loader.load(root)
    msg = str(err.value)
    assert "\n" not in msg and expect in msg, msg


def test_convert_gives_the_same_pictures(tiny_download, tmp_path):
    model = loader.load(tiny_download)
    out = loader.convert(tiny_download, tmp_path / "ckpt")
    assert (out / "config.yaml").is_file() and "architecture: musetalk" in (out / "config.yaml").read_text()
    assert not list(out.glob("*.pth")) and not list(out.glob("*.bin"))   # no pickles in our format
    again = loader.load(out)
    crops = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    lat = model.latents_for_unet(crops, sample=False)
    assert torch.equal(again.latents_for_unet(crops, sample=False), lat)
    wav = np.random.default_rng(2).standard_normal(8000).astype(np.float32) * 0.1
    chunks = model.audio_chunks(wav)
    assert torch.equal(again.audio_chunks(wav), chunks)
    assert torch.equal(again.render(lat, chunks[:1]), model.render(lat, chunks[:1]))
    from emo_stream.registry import family_of

    assert family_of(out)[0].name == "musetalk"
