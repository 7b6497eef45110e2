"""EchoMimic v1 import: exact against EchoMimic's own outputs (`emo-stream parity` on ../shared/golden), a
perturbed weight fails, broken files are one line naming file/key/shape, full-size key coverage from the
published manifests, weights-set detection, and convert round trip.

Only the comparisons with EchoMimic's outputs and manifests need ../shared/golden; the rest run on the
`echomimic_set` fixture (tests.conftest): the shared set when present, else a generated one in its layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from emo_stream.errors import WeightsError
from server.cli import main as cli_main
from tests.conftest import needs_shared_golden

WEIGHTS = ("reference_unet.pth", "denoising_unet.pth", "motion_module.pth", "face_locator.pth", "whisper_tiny.pt")
needs_reference = needs_shared_golden("echomimic-v1")


@pytest.fixture(scope="module")
def golden(echomimic_set) -> Path:
    """../shared/golden/echomimic-v1, else a generated set in its layout (tests.conftest.echomimic_set)."""
    return echomimic_set


def _case_file(golden: Path, section: str) -> Path:
    """A reference tensor file named by case.json (the shared and the generated sets name them differently)."""
    return golden / json.loads((golden / "case.json").read_text())[section]["file"]


def _cli(capsys, *argv):
    rc = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, [line for line in out.err.splitlines() if line.strip() and " INFO " not in line]


def _copy_set(golden: Path, dest: Path) -> Path:
    """The golden set in tmp: small files copied, weights copied (they get edited)."""
    shutil.copytree(golden, dest, ignore=shutil.ignore_patterns("manifests"))
    for p in dest.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dest


@pytest.fixture(scope="module")
def golden_model(golden):
    from emo_stream.families.echomimic.importer import load_download
    from emo_stream.families.echomimic.parity import config_from_case

    case = json.loads((golden / "case.json").read_text())
    return load_download(golden / "weights", config=config_from_case(case), with_vae=False)


# ---- exactness -----------------------------------------------------------------------------------------
@needs_reference
def test_parity_on_golden_set(golden, capsys):
    torch.set_num_threads(1)
    rc, out, err = _cli(capsys, "parity", golden)
    errors = json.loads(out)
    assert rc == 0, (errors, err)
    expected = {"face_locator.face_feature", "audio.log_mel", "audio.whisper_chunks", "denoiser_single.pred",
                "denoiser_single.cfg_pred_uncond", "denoiser_single.cfg_pred_cond", "acc_loop.final_latents",
                "acc_long_video.step0_call2_out", "acc_long_video.final_latents",
                "std_long_video_cfg.step1_model_output", "std_long_video_cfg.final_latents"}
    assert expected <= set(errors), sorted(errors)
    assert max(errors.values()) <= 1e-4, errors


def test_perturbed_weight_must_fail(golden, tmp_path, capsys):
    root = _copy_set(golden, tmp_path / "set")
    path = root / "weights" / "denoising_unet.pth"
    state = torch.load(path, weights_only=True)
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"   # an audio cross-attention
    state[key] = state[key] + 1e-2
    torch.save(state, path)
    rc, out, err = _cli(capsys, "parity", root, "--case", "denoiser_single")
    errors = json.loads(out)
    assert rc == 1 and "above" in err[-1]
    assert errors["denoiser_single.pred"] > 1e-4
    assert "denoiser_single.pred" in err[-1]


@needs_reference
def test_reference_bank_fp16_cast_is_what_echomimic_does(golden_model, golden):
    """The golden `pred` (bank cast to fp16) and `pred_bank_fp32` differ by ~1e-4: only the cast matches."""
    from safetensors.torch import load_file

    d = load_file(str(_case_file(golden, "denoiser_single_case")))
    audio = load_file(str(_case_file(golden, "audio_case")))["whisper_chunks"][:12][None]
    face = load_file(str(_case_file(golden, "face_locator_case")))["face_feature"]
    bank = golden_model.encode_reference(d["ref_latents"])
    assert all(v.dtype == torch.float16 for v in bank.values())
    v = golden_model.denoise(d["latents"], d["timestep"][0], audio, face, None, bank)
    assert (v - d["pred"]).abs().max() < 2e-5
    assert (v - d["pred_bank_fp32"]).abs().max() > (v - d["pred"]).abs().max()


# ---- broken inputs: one line naming file, key and shape ------------------------------------------------
def _edit(path: Path, fn) -> None:
    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)


@pytest.mark.parametrize("file,edit,words", [
    ("denoising_unet.pth", lambda s: s.__setitem__("conv_in.weight", torch.zeros(32, 4, 1, 1)),
     ["denoising_unet.pth", "conv_in.weight", "(32, 4, 1, 1)", "(32, 4, 3, 3)"]),
    ("reference_unet.pth", lambda s: s.pop("mid_block.attentions.0.proj_in.weight"),
     ["reference_unet.pth", "missing", "mid_block.attentions.0.proj_in.weight"]),
    ("motion_module.pth", lambda s: s.__setitem__("down_blocks.0.motion_modules.0.temporal_transformer.extra.weight",
                                                  torch.zeros(3)),
     ["motion_module.pth", "unexpected", "temporal_transformer.extra.weight", "(3,)"]),
])
def test_changed_weight_file_is_one_line(golden, tmp_path, capsys, file, edit, words):
    root = _copy_set(golden, tmp_path / "set")
    _edit(root / "weights" / file, edit)
    rc, _, err = _cli(capsys, "parity", root)
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err[0]


def test_foreign_file_is_one_line(golden, tmp_path, capsys):
    root = _copy_set(golden, tmp_path / "set")
    shutil.copy(root / "weights" / "reference_unet.pth", root / "weights" / "face_locator.pth")
    rc, _, err = _cli(capsys, "parity", root)
    assert rc == 2 and len(err) == 1, err
    assert "face_locator.pth" in err[0] and "unexpected key" in err[0], err[0]


def test_truncated_file_is_one_line(golden, tmp_path, capsys):
    root = _copy_set(golden, tmp_path / "set")
    path = root / "weights" / "motion_module.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, _, err = _cli(capsys, "parity", root)
    assert rc == 2 and len(err) == 1, err
    assert "motion_module.pth" in err[0] and "cannot read" in err[0], err[0]


def test_missing_golden_tensor_is_one_line(golden, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root = _copy_set(golden, tmp_path / "set")
    f = _case_file(root, "denoiser_single_case")
    t = load_file(str(f))
    t.pop("pred")
    save_file(t, str(f))
    rc, _, err = _cli(capsys, "parity", root, "--case", "denoiser_single")
    assert rc == 2 and f.name in err[-1] and "'pred'" in err[-1], err


# ---- full-size key coverage (published manifests, meta device) ----------------------------------------
@needs_reference
def test_full_size_key_coverage(golden):
    from emo_stream.families.echomimic.config import EchoMimicConfig
    from emo_stream.families.echomimic.importer import infer_config, map_weights
    from emo_stream.families.echomimic.model import EchoMimicModel

    manifests = {}
    for part, name in (("reference", "reference_unet"), ("denoiser", "denoising_unet_2d"),
                       ("motion", "motion_module"), ("face_locator", "face_locator")):
        data = json.loads((golden / "manifests" / f"{name}.json").read_text())
        manifests[part] = {t["key"]: torch.empty(t["shape"], device="meta") for t in data["tensors"]}
        assert len(manifests[part]) == data["num_tensors"]
    model = EchoMimicModel.build(EchoMimicConfig(), empty=True)   # SD1.5 size, whisper tiny
    own = model.state_dict()
    whisper = {k[len("whisper.encoder."):]: v for k, v in own.items() if k.startswith("whisper.encoder.")}
    files = {k: Path(f"{k}.pth") for k in ("reference", "denoiser", "motion", "face_locator", "whisper")}
    state = map_weights(own, {**manifests, "whisper": whisper}, files)
    assert set(state) == set(own)                                   # 0 missing, 0 unexpected
    assert all(tuple(state[k].shape) == tuple(own[k].shape) for k in own)
    # the sizes an importer infers from those shapes are the SD1.5 defaults
    inferred = infer_config(manifests["denoiser"], manifests["motion"], manifests["face_locator"],
                            EchoMimicConfig().whisper, files)
    assert inferred.denoiser == EchoMimicConfig().denoiser
    assert inferred.reference_unet == EchoMimicConfig().reference_unet
    assert inferred.face_locator == EchoMimicConfig().face_locator


# ---- weights sets and folder detection -----------------------------------------------------------------
def _fake_download(golden: Path, dest: Path, sets: tuple[str, ...]) -> Path:
    dest.mkdir()
    w = golden / "weights"
    for f in ("reference_unet.pth", "face_locator.pth"):
        (dest / f).symlink_to(w / f)
    (dest / "audio_processor").mkdir()
    (dest / "audio_processor" / "whisper_tiny.pt").symlink_to(w / "whisper_tiny.pt")
    for s in sets:
        suffix = "_acc" if s == "acc" else ""
        (dest / f"denoising_unet{suffix}.pth").symlink_to(w / "denoising_unet.pth")
        (dest / f"motion_module{suffix}.pth").symlink_to(w / "motion_module.pth")
    return dest


def test_detects_acc_and_normal_sets(golden, tmp_path):
    from emo_stream.families.echomimic.importer import choose_set
    from emo_stream.registry import family_of

    acc = _fake_download(golden, tmp_path / "acc", ("acc",))
    family, found = family_of(acc)
    assert family.name == "echomimic" and family.architecture == "echomimic-v1" and "acc weights" in found and "denoising_unet_acc.pth" in found
    both = _fake_download(golden, tmp_path / "both", ("acc", "normal"))
    assert "acc weights" in family_of(both)[1] and "also has normal" in family_of(both)[1]
    assert choose_set(both, "normal") == "normal"
    normal = _fake_download(golden, tmp_path / "normal", ("normal",))
    assert "normal weights" in family_of(normal)[1]
    (acc / "motion_module_acc.pth").unlink()
    with pytest.raises(WeightsError, match="no complete EchoMimic weights set"):
        choose_set(acc)
    with pytest.raises(WeightsError, match="acc weights asked for, but motion_module_acc.pth is missing"):
        choose_set(acc, "acc")


def test_download_folder_loads_with_published_defaults(golden, tmp_path):
    from emo_stream.registry import load_model

    model = load_model(_fake_download(golden, tmp_path / "acc", ("acc",)))
    assert model.config.weights_set == "acc"
    assert (model.config.sampling.steps, model.config.sampling.guidance) == (6, 1.0)
    assert model.config.audio_tokens_per_frame == 20   # 10 rows x (1 + 1 layer) in the shrunken set


# ---- convert: our own checkpoint, no original folder needed -----------------------------------------
def test_convert_round_trip(golden, golden_model, tmp_path, capsys):
    import yaml
    from safetensors.torch import load_file

    from emo_stream.registry import load_model

    src = _fake_download(golden, tmp_path / "dl", ("acc",))
    rc, _, err = _cli(capsys, "convert", src, "--out", tmp_path / "ckpt")
    assert rc == 0, err
    shutil.rmtree(src)                                               # the original is gone
    cfg = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert cfg["architecture"] == "echomimic-v1" and cfg["weights_set"] == "acc"
    assert cfg["scheduler"]["prediction_type"] == "v_prediction" and cfg["scheduler"]["rescale_betas_zero_snr"]
    assert cfg["uncond_drops"] == ["audio", "face", "reference"] and cfg["fps"] == 24
    model = load_model(tmp_path / "ckpt")
    d = load_file(str(_case_file(golden, "denoiser_single_case")))
    audio = load_file(str(_case_file(golden, "audio_case")))["whisper_chunks"][:12][None]
    face = model.face_feature(load_file(str(_case_file(golden, "face_locator_case")))["face_mask"])
    a = model.denoise(d["latents"], d["timestep"][0], audio, face, None, model.encode_reference(d["ref_latents"]))
    b = golden_model.denoise(d["latents"], d["timestep"][0], audio, face, None,
                             golden_model.encode_reference(d["ref_latents"]))
    assert torch.equal(a, b)
    rc, _, err = _cli(capsys, "convert", tmp_path / "ckpt", "--out", tmp_path / "again")
    assert rc == 2 and "already an emo-stream checkpoint" in err[-1]


# ---- the pieces that differ from stock diffusers -------------------------------------------------------
def test_temporal_group_norm_is_per_frame():
    from emo_stream.families.echomimic.layers import PerFrameGroupNorm

    norm = PerFrameGroupNorm.replacing(torch.nn.GroupNorm(2, 4))
    x = torch.randn(1, 4, 3, 5, 5)
    y = x.clone()
    y[:, :, 2] *= 10                                                 # change only frame 2
    assert torch.allclose(norm(x)[:, :, :2], norm(y)[:, :, :2], atol=1e-6)
    stock = torch.nn.GroupNorm(2, 4)                                 # diffusers' way: over all frames
    assert not torch.allclose(stock(x)[:, :, :2], stock(y)[:, :, :2], atol=1e-3)


def test_mel_filters_match_transformers():
    import numpy as np
    from transformers.audio_utils import mel_filter_bank

    from emo_stream.families.echomimic.audio import mel_filters

    ours = mel_filters(80)
    theirs = mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                             sampling_rate=16000, norm="slaney", mel_scale="slaney").T
    assert ours.dtype == np.float32 and ours.shape == (80, 201)
    assert np.abs(ours - theirs).max() < 1e-8                       # same filters up to float32 rounding


def test_convert_picks_the_weights_set(golden, tmp_path, capsys):
    import yaml

    src = _fake_download(golden, tmp_path / "dl", ("acc", "normal"))
    rc, _, err = _cli(capsys, "convert", src, "--out", tmp_path / "ckpt", "--weights-set", "normal")
    assert rc == 0, err
    cfg = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert cfg["weights_set"] == "normal" and cfg["sampling"]["steps"] == 30 and cfg["sampling"]["guidance"] == 2.5


def test_convert_keeps_the_vae(golden, golden_model, tmp_path, capsys):
    """sd-vae-ft-mse/ in the download folder goes into the checkpoint: encode/decode survive the round trip."""
    from diffusers import AutoencoderKL

    from emo_stream.registry import load_model

    src = _fake_download(golden, tmp_path / "dl", ("acc",))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=32).save_pretrained(src / "sd-vae-ft-mse")
    direct = load_model(src)
    assert direct.vae is not None
    assert _cli(capsys, "convert", src, "--out", tmp_path / "ckpt")[0] == 0
    shutil.rmtree(src)
    model = load_model(tmp_path / "ckpt")
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    lat = model.encode_image(img)
    assert lat.shape == (1, 4, 16, 16) and torch.equal(lat, direct.encode_image(img))
    assert torch.equal(model.decode_latents(lat), direct.decode_latents(lat))
