"""`emo-stream parity` works on ANY folder in the golden format, not only the two shared dev sets.

The sets here come from tests/golden_sets.py: other UNet widths/depths/heads, motion-module heads and
position table length, whisper / wav2vec2 depths, face-locator widths, image size (non-square too), boxes,
fps, audio length, frame counts, clip length, motion frames, motion scale, steps, timesteps, guidance, context
windows, seeds and file names, with random weights written in the published formats. Their reference outputs
are made by OUR implementation, so these tests check that nothing in the runners is tied to the dev sets
(every value comes from case.json or the weight files), NOT that our numbers equal EchoMimic's / Hallo's: the
shared sets made by the original code check that (test_echomimic_model.py, test_hallo.py). A perturbed output
must fail, and broken folders are one line with exit status 2. Needs nothing from ../shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.cli import main as cli_main
from golden_sets import make_echomimic_set, make_hallo_set  # tests/ is on sys.path (pytest rootdir)

TOL = 1e-4


def _cli(capsys, *argv):
    rc = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, [line for line in out.err.splitlines() if line.strip() and " INFO " not in line]


@pytest.fixture(scope="module")
def echo_set(tmp_path_factory):
    torch.set_num_threads(1)
    return make_echomimic_set(tmp_path_factory.mktemp("golden") / "echo")


@pytest.fixture(scope="module")
def hallo_set(tmp_path_factory):
    torch.set_num_threads(1)
    return make_hallo_set(tmp_path_factory.mktemp("golden") / "hallo")


@pytest.fixture(params=["echo", "hallo"])
def golden(request):
    return request.getfixturevalue(f"{request.param}_set")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _case(root: Path) -> dict:
    return json.loads((root / "case.json").read_text())


def _write_case(root: Path, case: dict) -> None:
    (root / "case.json").write_text(json.dumps(case))


def _groups(case: dict) -> set[str]:
    """The case groups a set lists, read from its case.json (sampler cases by their own names)."""
    groups = {k[: -len("_case")] for k, v in case.items() if k.endswith("_case") and v}
    return groups | set(case.get("sampler_cases") or {})


def test_generated_sets_differ_from_the_dev_sets(echo_set, hallo_set):
    """The point of these sets: the knobs the dev sets fix are all different here."""
    echo, hallo = _case(echo_set), _case(hallo_set)
    assert echo["unet_3d_config"]["block_out_channels"] != [32] * 4 and echo["unet_3d_config"]["layers_per_block"] == 2
    assert echo["weights"]["whisper_dims"]["n_audio_layer"] == 2 and "denoising_unet_acc.pth" in echo["weights"]
    assert {s["video_length"] for s in echo["sampler_cases"].values()} == {10, 16}
    assert hallo["denoiser_single_case"]["clip_length"] == 12 and hallo["denoiser_single_case"]["n_motion_frames"] == 3
    assert hallo["cfg_loop_case"]["num_inference_steps"] == 4 and hallo["masks_and_face_case"]["image_hw"] == [64, 128]
    assert hallo["weights"]["wav2vec2_config"]["num_hidden_layers"] == 3


def test_parity_passes_on_a_generated_set(golden, capsys):
    rc, out, err = _cli(capsys, "parity", golden)
    errors = json.loads(out)
    assert rc == 0, (err, errors)
    assert max(errors.values()) <= TOL
    case = _case(golden)
    assert {k.split(".")[0] for k in errors} == _groups(case)      # every case it lists, nothing else
    for name, sc in (case.get("sampler_cases") or {}).items():      # every step and stored window call
        steps = sc["num_inference_steps"]
        assert f"{name}.step{steps - 1}_model_output" in errors and f"{name}.windows" in errors
        assert {f"{name}.{k}" for k in sc["tensors"] if "_call" in k} <= set(errors)
    if "cfg_loop_case" in case:
        steps = case["cfg_loop_case"]["num_inference_steps"]
        assert {f"cfg_loop.step{steps - 1}_{p}" for p in ("model_output", "pred_uncond", "pred_cond")} <= set(errors)


def _perturb(root: Path, file: str, key: str, by: float = 1e-3) -> None:
    tensors = load_file(str(root / file))
    tensors[key] = tensors[key] + by
    save_file(tensors, str(root / file))


@pytest.mark.slow
def test_parity_passes_on_a_non_square_echomimic_set(tmp_path, capsys):
    root = make_echomimic_set(tmp_path / "echo", image=[128, 64], box=[6, 20, 50, 100])
    rc, out, err = _cli(capsys, "parity", root)
    assert rc == 0 and max(json.loads(out).values()) <= TOL, err


def test_perturbed_output_must_fail(golden, tmp_path, capsys):
    root = _copy(golden, tmp_path)
    case = _case(root)
    if "sampler_cases" in case:
        name, sc = next(iter(case["sampler_cases"].items()))
        _perturb(root, sc["file"], "final_latents")
        group, bad = name, f"{name}.final_latents"
    else:
        _perturb(root, case["cfg_loop_case"]["file"], "final_latents")
        group, bad = "cfg_loop", "cfg_loop.final_latents"
    rc, out, err = _cli(capsys, "parity", root, "--case", group)
    assert rc == 1 and json.loads(out)[bad] > TOL
    assert bad in err[-1]


def test_missing_case_sections_are_not_reported(golden, tmp_path, capsys):
    """A set in the format may leave cases out (e.g. no std_long_video_cfg, no guided loop)."""
    root = _copy(golden, tmp_path)
    case = _case(root)
    if "sampler_cases" in case:   # EchoMimic: keep only the face locator and the audio features
        dropped = ("denoiser_single_case", "sampler_cases")
    else:                         # Hallo: keep only the masks and the audio features
        dropped = ("denoiser_single_case", "cfg_loop_case")
    for key in dropped:
        del case[key]
    _write_case(root, case)
    rc, out, err = _cli(capsys, "parity", root)
    assert rc == 0, err
    assert {k.split(".")[0] for k in json.loads(out)} == _groups(case) and len(_groups(case)) == 2


def test_echomimic_sizes_left_out_of_case_json_come_from_the_files(echo_set, tmp_path, capsys):
    root = _copy(echo_set, tmp_path)
    case = _case(root)
    del case["face_locator"], case["weights"]["whisper_dims"]
    _write_case(root, case)
    rc, out, err = _cli(capsys, "parity", root, "--case", "face_locator", "--case", "audio")
    assert rc == 0 and max(json.loads(out).values()) <= TOL, err


def _one_line(capsys, root, *words, argv=()):
    rc, out, err = _cli(capsys, "parity", root, *argv)
    assert rc == 2 and len(err) == 1 and err[0].startswith("emo-stream parity: error:"), err
    assert all(w in err[0] for w in words), err


def test_missing_output_file_is_one_line(golden, tmp_path, capsys):
    root = _copy(golden, tmp_path)
    case = _case(root)
    section = "face_locator_case" if "face_locator_case" in case else "masks_and_face_case"
    (root / case[section]["file"]).unlink()
    _one_line(capsys, root, case[section]["file"], "missing")


def test_listed_tensor_missing_is_one_line(golden, tmp_path, capsys):
    root = _copy(golden, tmp_path)
    case = _case(root)
    section = "face_locator_case" if "face_locator_case" in case else "masks_and_face_case"
    file = case[section]["file"]
    tensors = load_file(str(root / file))
    key = "face_feature" if "face_feature" in tensors else "face_tokens"
    del tensors[key]
    save_file(tensors, str(root / file))
    case[section].setdefault("tensors", {})[key] = [1]
    _write_case(root, case)
    _one_line(capsys, root, file, key)


@pytest.mark.parametrize("which", ["file", "folder"])
def test_missing_weights_is_one_line(golden, tmp_path, capsys, which):
    root = _copy(golden, tmp_path)
    if which == "folder":
        shutil.rmtree(root / "weights")
        _one_line(capsys, root, "weights")
    else:
        name = "net.pth" if (root / "weights" / "net.pth").is_file() else "reference_unet.pth"
        (root / "weights" / name).unlink()
        _one_line(capsys, root, name)


def test_other_size_weights_are_one_line(echo_set, hallo_set, tmp_path, capsys):
    """The set's case.json describes one size, its weights are another: named file, key and shapes."""
    root = _copy(hallo_set, tmp_path)
    case = _case(root)
    case["unet_2d_config"]["block_out_channels"] = [32] * 4
    _write_case(root, case)
    _one_line(capsys, root, "net.pth", "shape")
    root = _copy(echo_set, tmp_path)
    case = _case(root)
    for key in ("unet_2d_config", "unet_3d_config"):
        case[key]["layers_per_block"] = 1
    _write_case(root, case)
    _one_line(capsys, root, ".pth")


def test_malformed_case_entry_is_one_line(golden, tmp_path, capsys):
    root = _copy(golden, tmp_path)
    case = _case(root)
    section = "face_locator_case" if "face_locator_case" in case else "masks_and_face_case"
    case[section]["image_hw"] = "big"
    _write_case(root, case)
    _one_line(capsys, root, "case.json", argv=("--case", section[: -len("_case")]))


def test_unsupported_variant_is_one_line(golden, tmp_path, capsys):
    """A configuration knob our model does not implement is refused by name, never silently ignored."""
    root = _copy(golden, tmp_path)
    case = _case(root)
    case["unet_additional_kwargs"]["use_inflated_groupnorm"] = False
    _write_case(root, case)
    _one_line(capsys, root, "unsupported", "group norm")


def test_case_json_naming_no_case_is_one_line(golden, tmp_path, capsys):
    root = _copy(golden, tmp_path)
    case = {k: v for k, v in _case(root).items() if not (k.endswith("_case") or k == "sampler_cases")}
    _write_case(root, case)
    _one_line(capsys, root, "lists no case")


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["parity", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "exit status" in text and all(f"\n  {c}  " in text for c in (0, 1, 2))
