"""`emo-stream parity` is not tied to the shared golden set: a second set in the same format, at other sizes
(wider and deeper UNets, 2 whisper layers, other face-locator widths, acc file names), written here in the
published files' formats, replays through the same importer. Its reference outputs are made by our model, so
this checks the plumbing (configs from case.json, file names, shapes), not EchoMimic's numbers: those are
test_echomimic_model.py's job."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as _save_file

from server.cli import main as cli_main
from tests.conftest import SHARED
from tests.golden_sets import echomimic_denoiser_case

GOLDEN = SHARED / "golden" / "echomimic-v1"  # ../shared (tests.conftest; EMO_TESTS_NO_SHARED hides it)

def save_file(tensors: dict, path: str) -> None:
    _save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def make_set(root: Path) -> Path:
    """A golden-format folder at other sizes, reference outputs computed by our model through the importer."""
    from emo_stream.families.echomimic.sampling import EchoSampling, initial_latents, make_scheduler, sample
    from emo_stream.families.echomimic.audio import frame_rows, log_mel
    from emo_stream.families.echomimic.importer import load_download
    from emo_stream.families.echomimic.layers import face_mask
    from emo_stream.families.echomimic.parity import config_from_case
    from emo_stream.families.echomimic.testing import live_model, published_files

    case = json.loads((GOLDEN / "case.json").read_text())
    new = copy.deepcopy(case)
    for key in ("unet_2d_config", "unet_3d_config"):
        new[key].update(block_out_channels=[32, 64, 64, 64], layers_per_block=2)
    new["face_locator"].update(block_out_channels=[8, 8, 16, 32])
    new["weights"] = {k.replace("denoising_unet.pth", "denoising_unet_acc.pth")
                       .replace("motion_module.pth", "motion_module_acc.pth"): v for k, v in case["weights"].items()}
    new["weights"]["whisper_dims"] = dict(case["weights"]["whisper_dims"], n_audio_layer=2)
    new["face_locator_case"]["face_box_xyxy_pixels"] = [2, 3, 60, 70]   # grown box leaves the image (top/left)
    sampler = new["sampler_cases"]
    new["sampler_cases"] = {"acc_loop": sampler["acc_loop"], "std_long_video_cfg": sampler["std_long_video_cfg"]}
    new["sampler_cases"]["acc_loop"]["num_inference_steps"] = 2
    (root / "weights").mkdir(parents=True)
    (root / "case.json").write_text(json.dumps(new))
    shutil.copy(GOLDEN / "audio.wav", root / "audio.wav")

    config = config_from_case(new)
    for name, state in published_files(live_model(config)).items():   # every layer live (zero-init ones too)
        (root / "weights" / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, root / "weights" / name)
    model = load_download(root / "weights", config=config_from_case(new), with_vae=False)

    from emo_stream.families.echomimic.parity import _read_wav

    wav = _read_wav(root / "audio.wav")
    feats = model.audio_features(wav)
    chunks = model.audio_tokens(wav, fps=24)
    save_file({"waveform": wav, "log_mel": log_mel(wav), "whisper_features": feats, "whisper_chunks": chunks,
               "chunk_feature_index": frame_rows(len(chunks), feats.shape[0], 24)}, str(root / "audio.safetensors"))
    fc = new["face_locator_case"]
    mask = face_mask(fc["face_box_xyxy_pixels"], *fc["image_hw"], clamp=False)
    face = model.face_feature(mask)
    save_file({"face_mask": mask, "face_feature": face}, str(root / "face_locator.safetensors"))

    g = torch.Generator().manual_seed(5)
    ref, x = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 12, 16, 16, generator=g)
    t = torch.tensor([832])
    save_file(echomimic_denoiser_case(model, ref, x, t, chunks[:12][None], face),
              str(root / "denoiser_single.safetensors"))

    for name, sc in new["sampler_cases"].items():
        acc = "_acc" in sc["pipeline"]
        settings = EchoSampling(steps=sc["num_inference_steps"], guidance=sc["guidance_scale"],
                                context_frames=sc["context_frames"], context_overlap=sc["context_overlap"],
                                pseudo_velocity=acc, sum_unguided_overlaps=not acc)
        frames = sc["video_length"]
        seed = int(re.search(r"manual_seed\((\d+)\)", sc["generator"]).group(1))   # parity checks the noise
        x0 = initial_latents((1, 4, frames, 16, 16), torch.Generator().manual_seed(seed))
        ref = torch.randn(1, 4, 16, 16, generator=g)
        steps: dict[str, torch.Tensor] = {}
        sched = make_scheduler(**new["noise_scheduler_kwargs"])
        final = sample(model.denoiser_fn(model.encode_reference(ref)), x0, chunks[:frames][None], face, settings,
                       scheduler=sched, on_step=lambda i, v: steps.__setitem__(f"step{i}_model_output", v))
        save_file({"initial_latents": x0, "ref_latents": ref, "final_latents": final,
                   "timesteps": sched.timesteps.clone(), **steps}, str(root / f"{name}.safetensors"))
    return root


@pytest.mark.slow
def test_parity_runs_on_another_set_in_the_format(tmp_path, capsys):
    if not (GOLDEN / "case.json").is_file():
        pytest.skip("../shared/golden/echomimic-v1 is not present")
    torch.set_num_threads(1)
    root = make_set(tmp_path / "other")
    rc = cli_main(["parity", str(root)])
    errors = json.loads(capsys.readouterr().out)
    assert rc == 0, errors
    assert "std_long_video_cfg.final_latents" in errors and "acc_loop.step1_model_output" in errors
    assert max(errors.values()) <= 1e-6, errors
