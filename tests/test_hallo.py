"""Hallo / Hallo2: exactness against Hallo's own outputs (../shared/golden/hallo), a perturbed weight that must
fail, full-size key coverage of net.pth on the meta device, the quirks that change the output (fp16 bank,
reference tiling under guidance, motion modules that never run), importer errors and folder detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_stream.errors import WeightsError
from emo_stream.families.hallo import parity as hparity
from emo_stream.families.hallo.config import HalloConfig
from emo_stream.families.hallo.loader import detect, find_download, load_net_file
from emo_stream.families.hallo.masks import boxes_from_dlib68, expand_box, region_masks
from emo_stream.families.hallo.model import HalloModel
from tests.conftest import SHARED_GOLDEN, needs_shared_golden

# Hallo's own outputs and the full-size manifest are only in ../shared/golden/hallo; everything else runs on
# `hallo_set` (tests.conftest): the shared set when present, else a generated one in the same format.
needs_golden = needs_shared_golden("hallo")
needs_golden_64 = needs_shared_golden("hallo-64px")
TOL = 1e-4
# The shared "hallo" set was made by another torch build: Hallo's own code run here differs from its guided loop
# by up to 3.2e-4 (tools/golden_hallo.py --from-set; docs/parity.md), and ours equals Hallo's own code run here
# bit for bit (0.0 on every case). So its loop gets the cross-build margin; every same-build set gets TOL.
TOL_OTHER_BUILD_LOOP = 5e-4


@pytest.fixture(scope="module")
def GOLDEN(hallo_set) -> Path:
    return hallo_set


@pytest.fixture(scope="module")
def golden(GOLDEN):
    torch.set_num_threads(1)
    case = hparity.read_case(GOLDEN)
    return hparity.build_model(GOLDEN, case), case


@pytest.fixture(scope="module")
def all_errors(golden, GOLDEN):
    model, case = golden
    errors = {}
    for replay in (hparity.replay_masks, hparity.replay_audio, hparity.replay_denoiser, hparity.replay_loop):
        errors.update(replay(model, GOLDEN, case))
    return errors


# ---- exactness -------------------------------------------------------------------------------------
@needs_golden
@pytest.mark.parametrize("group", ["masks_and_face", "audio", "denoiser_single", "cfg_loop"])
def test_every_golden_case_within_tolerance(all_errors, group, GOLDEN):
    errs = {k: v for k, v in all_errors.items() if k.startswith(group + ".")}
    assert errs, f"no {group} case replayed"
    tol = TOL_OTHER_BUILD_LOOP if group == "cfg_loop" and GOLDEN == SHARED_GOLDEN / "hallo" else TOL
    assert all(np.isfinite(v) and v <= tol for v in errs.values()), errs


@pytest.fixture(scope="module")
def errors_64():
    """../shared/golden/hallo-64px: 8x8 latents, so the lowest UNet level is 1x1 and each of its group norms
    normalises a single value; their rounding noise (~1e-4) follows the input's last bits, so this set only
    passes when the denoiser computes what Hallo's code computes in the same order and memory layout."""
    torch.set_num_threads(1)
    golden = SHARED_GOLDEN / "hallo-64px"
    return hparity.run_cases(golden)


@needs_golden_64
@pytest.mark.parametrize("group", ["masks_and_face", "audio", "denoiser_single", "cfg_loop"])
def test_hallo_64px_every_case_within_tolerance(errors_64, group):
    errs = {k: v for k, v in errors_64.items() if k.startswith(group + ".")}
    assert errs, f"no {group} case replayed"
    assert all(np.isfinite(v) and v <= TOL for v in errs.values()), errs


@needs_golden
def test_every_reference_tensor_is_replayed(all_errors, GOLDEN):
    from safetensors import safe_open
    case = json.loads((GOLDEN / "case.json").read_text())
    for section, prefix, skip in (("denoiser_single_case", "denoiser_single", {"latents", "timestep", "ref_latents",
                                                                               "diag_pred_if_eval_mode"}),
                                  ("cfg_loop_case", "cfg_loop", set())):
        with safe_open(GOLDEN / case[section]["file"], "pt") as f:
            names = set(f.keys()) - skip
        assert {f"{prefix}.{n}" for n in names} <= set(all_errors), names


def test_perturbed_weight_must_fail(golden, GOLDEN):
    model, case = golden
    w = model.denoising_unet.unet.up_blocks[1].audio_modules[0].transformer_blocks[0].zero_conv_lip.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(0.05 * torch.randn_like(w))
        err = hparity.replay_denoiser(model, GOLDEN, case, only_pred=True)["denoiser_single.pred"]
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert err > 10 * TOL


def test_motion_modules_of_blocks_without_transformers_never_run(golden, GOLDEN):
    """Hallo's inference runs the denoiser in training mode with gradient checkpointing: DownBlock3D /
    UpBlock3D then skip their motion modules, CrossAttn blocks run theirs."""
    model, case = golden
    unet = model.denoising_unet.unet

    def pred_err_after_scaling(module) -> float:
        p = module.temporal_transformer.proj_out.weight
        saved = p.detach().clone()
        try:
            with torch.no_grad():
                p.add_(torch.randn_like(p))
            return hparity.replay_denoiser(model, GOLDEN, case, only_pred=True)["denoiser_single.pred"]
        finally:
            with torch.no_grad():
                p.copy_(saved)

    assert pred_err_after_scaling(unet.down_blocks[3].motion_modules[0]) <= TOL
    assert pred_err_after_scaling(unet.up_blocks[0].motion_modules[1]) <= TOL
    assert pred_err_after_scaling(unet.up_blocks[1].motion_modules[0]) > 10 * TOL


@needs_golden
def test_fp16_bank_rounding_matters(golden, GOLDEN):
    """Hallo rounds the reference bank to fp16 even in fp32; the fp32 bank misses `pred` by ~3e-4."""
    from safetensors.torch import load_file
    model, case = golden
    dn = load_file(str(GOLDEN / case["denoiser_single_case"]["file"]))
    clip = hparity.golden_clip(model, GOLDEN, case)
    model.config.bank_dtype = "float32"
    try:
        model.prepare_reference(clip, guided=False)
        with torch.no_grad():
            fp32 = model.denoise(dn["latents"], dn["timestep"].long(), clip, guided=False)
    finally:
        model.config.bank_dtype = "float16"
    assert float((fp32 - dn["pred"]).abs().max()) > TOL


# ---- key coverage at full size -----------------------------------------------------------------------
@needs_golden
def test_full_size_net_pth_keys_on_meta_device(GOLDEN):
    manifest = json.loads((GOLDEN / "manifests" / "net.json").read_text())
    expected = {t["key"]: tuple(t["shape"]) for t in manifest["tensors"]}
    with torch.device("meta"):
        model = HalloModel(HalloConfig())
    own = {k: tuple(v.shape) for k, v in model.net_state_dict().items()}
    assert sorted(set(expected) - set(own)) == []
    assert sorted(set(own) - set(expected)) == []
    assert {k: s for k, s in own.items() if expected[k] != s} == {}
    assert sum(int(np.prod(s)) for s in own.values()) == manifest["num_elements"]


# ---- importer errors ---------------------------------------------------------------------------------
def test_truncated_net_pth_is_one_line(tmp_path, GOLDEN):
    bad = tmp_path / "net.pth"
    bad.write_bytes((GOLDEN / "weights" / "net.pth").read_bytes()[:4000])
    with pytest.raises(WeightsError) as exc:
        load_net_file(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


def test_foreign_state_dict_names_file_and_key(tmp_path):
    path = tmp_path / "net.pth"
    torch.save({"model.layer.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match=r"not a Hallo net\.pth .*model\.layer\.weight"):
        load_net_file(path)


def test_shape_mismatch_names_the_key(golden, GOLDEN):
    model, _ = golden
    state = dict(load_net_file(GOLDEN / "weights" / "net.pth"))
    key = "imageproj.proj.weight"
    state[key] = torch.zeros(3, 3, dtype=torch.float16)
    with pytest.raises(WeightsError, match=r"net\.pth: tensor imageproj\.proj\.weight has shape \(3, 3\)"):
        model.load_net_state(state, "net.pth")
    state.pop(key)
    with pytest.raises(WeightsError, match=r"missing tensor imageproj\.proj\.weight"):
        model.load_net_state(state, "net.pth")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "net.pth"
    torch.save({"reference_unet.x": torch.zeros(1), "obj": Path("x")}, path)
    with pytest.raises(WeightsError, match="net.pth"):
        load_net_file(path)


# ---- folder detection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,title", [("hallo", "Hallo download"), ("hallo2", "Hallo2 download")])
def test_download_layout_detected(tmp_path, variant, title):
    root = tmp_path / "pretrained_models"
    (root / variant).mkdir(parents=True)
    (root / variant / "net.pth").write_bytes(b"")
    (root / "wav2vec" / "wav2vec2-base-960h").mkdir(parents=True)
    assert detect(root).startswith(title)
    assert find_download(root / variant).root == root     # --model may name the subfolder
    assert "vae: MISSING" in detect(root)
    assert detect(tmp_path) is None


def test_registry_knows_hallo(tmp_path):
    from emo_stream import registry
    (tmp_path / "hallo2").mkdir()
    (tmp_path / "hallo2" / "net.pth").write_bytes(b"")
    family, found = registry.family_of(tmp_path)
    assert family.name == "hallo" and family.architecture == "hallo" and found.startswith("Hallo2")
    assert registry.parity_family("hallo") is family


def make_download(root: Path, case: dict, variant: str = "hallo", golden: Path | None = None) -> Path:
    """A download-shaped folder from a golden-format set's weights (default ../shared/golden/hallo): net.pth,
    wav2vec2, the UNet config."""
    GOLDEN = golden or SHARED_GOLDEN / "hallo"
    (root / variant).mkdir(parents=True)
    shutil.copy(GOLDEN / "weights" / "net.pth", root / variant / "net.pth")
    shutil.copytree(GOLDEN / "weights" / "wav2vec2-base-960h", root / "wav2vec" / "wav2vec2-base-960h")
    (root / "stable-diffusion-v1-5" / "unet").mkdir(parents=True)
    (root / "stable-diffusion-v1-5" / "unet" / "config.json").write_text(json.dumps(case["unet_2d_config"]))
    return root


def test_converted_checkpoint_loads_without_the_download(tmp_path, golden, GOLDEN):
    """Download-shaped folder -> convert -> load: same weights, module sizes read off net.pth."""
    from emo_stream.families.hallo import loader
    model, case = golden
    root = make_download(tmp_path / "pretrained_models", case, golden=GOLDEN)
    from_download = loader.load_hallo(root)
    out = loader.convert(root, tmp_path / "ckpt")
    shutil.rmtree(root)
    loaded = loader.load_hallo(out)
    a, b = loaded.net_state_dict(), model.net_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config.audioproj == from_download.config.audioproj == HalloConfig.from_case(case).audioproj


# ---- masks from our landmarks ----------------------------------------------------------------------------
def test_expand_box_shifts_back_inside():
    assert expand_box((0.0, 10.0, 20.0, 30.0), 64, 64, 2.0) == (0, 0, 40, 40)
    assert expand_box((50.0, 50.0, 64.0, 64.0), 64, 64, 2.0) == (36, 36, 64, 64)


def test_dlib_points_give_nested_masks():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform([30, 40], [98, 110], (48, 2)), rng.uniform([52, 86], [76, 98], (20, 2))])
    face, lip = boxes_from_dlib68(pts)
    rm = region_masks(face, lip, 128, 128)
    levels = rm.levels((128, 128))
    assert [l[0].shape[1] for l in levels] == [256, 64, 16, 4]
    # the lip region is inside the face region and the background is low where the face is
    assert rm.lip.max() == 255 and rm.background[32, 32] < rm.background[0, 0]
