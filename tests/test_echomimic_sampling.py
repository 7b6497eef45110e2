"""EchoMimic's sampling loop (emo_stream.families.echomimic.sampling) over fake denoisers.

The golden set's window lists, initial noise and DDIM trajectory are replayed without a model: a fake
denoiser that returns the golden averaged v for the frames it is given must land on the golden final
latents. Exactness with the real denoiser is `emo-stream parity`'s job.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from emo_stream.families.echomimic.sampling import (ACC, NORMAL, EchoSampling, Held, context_windows, initial_latents,
                                           make_scheduler, pseudo_velocity, rotated, sample)
from tests.conftest import SHARED

GOLDEN = SHARED / "golden" / "echomimic-v1"  # ../shared (tests.conftest; EMO_TESTS_NO_SHARED hides it)


@pytest.fixture(scope="module")
def golden() -> dict:
    if not (GOLDEN / "case.json").is_file():
        pytest.skip("../shared/golden/echomimic-v1 is not present")
    return json.loads((GOLDEN / "case.json").read_text())


def _settings(case: dict) -> EchoSampling:
    acc = "acc" in case["pipeline"]
    return EchoSampling(steps=case["num_inference_steps"], guidance=case["guidance_scale"],
                        context_frames=case["context_frames"], context_overlap=case["context_overlap"],
                        pseudo_velocity=acc, sum_unguided_overlaps=not acc)


def test_windows_match_golden(golden):
    for name, case in golden["sampler_cases"].items():
        base = context_windows(case["video_length"], case["context_frames"], case["context_overlap"])
        assert base == case["windows_step0"], name
        for i, expected in enumerate(case["windows_per_step_after_rotation"]):
            assert rotated(base, i, 2, case["video_length"]) == expected, (name, i)


def test_windows_cover_every_frame():
    for frames in (1, 5, 12, 13, 24, 25, 100):
        windows = context_windows(frames, 12, 3)
        assert sorted({f for w in windows for f in w}) == list(range(frames))
        assert all(len(w) == min(12, frames) and len(set(w)) == len(w) for w in windows)


def test_scheduler_timesteps_match_published_runs():
    s = make_scheduler()
    s.set_timesteps(6)
    assert s.timesteps.tolist() == [999, 832, 666, 499, 332, 166]
    s.set_timesteps(30)
    assert s.timesteps.tolist()[:3] == [999, 966, 932]
    assert float(s.alphas_cumprod[999]) == 0.0  # zero terminal SNR


@pytest.mark.parametrize("name", ["acc_loop", "acc_long_video", "std_long_video_cfg"])
def test_replay_golden_trajectory(golden, name):
    """Initial noise from the seed, scheduler, rotation, averaging and guidance: a denoiser returning the
    golden averaged v for its frames (cond and uncond alike) reproduces the golden final latents."""
    from safetensors.torch import load_file

    case = golden["sampler_cases"][name]
    t = load_file(GOLDEN / case["file"])
    seed = int(case["generator"].split("(")[1].split(")")[0])
    x = initial_latents(tuple(t["initial_latents"].shape), torch.Generator().manual_seed(seed))
    assert torch.equal(x, t["initial_latents"])
    frames = x.shape[2]
    sched = make_scheduler()
    sched.set_timesteps(case["num_inference_steps"])
    step_of = {int(v): i for i, v in enumerate(sched.timesteps)}
    # the frame indices travel in the audio tokens, so the fake denoiser knows which frames it got
    audio = torch.arange(1, frames + 1, dtype=torch.float32).reshape(1, frames, 1, 1)
    calls = []

    def denoiser(latents, timestep, audio_rows, face, with_reference):
        window = audio_rows[-1, :, 0, 0].long() - 1
        assert bool(with_reference[-1]) and (audio_rows[0].abs().sum() == 0) == (len(with_reference) == 2)
        calls.append(window.tolist())
        v = t[f"step{step_of[int(timestep)]}_model_output"][:, :, window]
        return v.repeat(latents.shape[0], 1, 1, 1, 1)

    out = sample(denoiser, x, audio, torch.zeros(1, 2, 1, 1, 1), _settings(case))
    assert calls == [w for step in case["windows_per_step_after_rotation"] for w in step]
    assert (out - t["final_latents"]).abs().max() < 1e-5


def test_window_averaging_and_guidance_order():
    """v of a frame = mean over the windows that hold it, then uncond + g * (cond - uncond)."""
    frames, g = 20, 2.5
    x = torch.zeros(1, 1, frames, 1, 1)
    audio = torch.arange(1, frames + 1, dtype=torch.float32).reshape(1, frames, 1, 1)
    seen = []

    def denoiser(latents, timestep, audio_rows, face, with_reference):
        seen.append(audio_rows[-1, :, 0, 0].long().tolist())
        window_id = float(len(seen))
        cond = torch.full_like(latents[1:], window_id)
        return torch.cat([torch.zeros_like(cond), cond])   # uncond 0, cond = the window's number

    steps = []
    sample(denoiser, x, audio, torch.zeros(1, 1, 1, 1, 1), EchoSampling(steps=1, guidance=g, rotation=0),
           on_step=lambda i, v: steps.append(v))
    expected = torch.zeros(frames)
    count = torch.zeros(frames)
    for k, w in enumerate(seen):
        for f in w:
            expected[f - 1] += k + 1
            count[f - 1] += 1
    assert torch.allclose(steps[0].flatten(), g * expected / count)
    assert count.min() >= 1 and count.max() >= 2  # overlaps really were averaged


def test_unconditional_rows_drop_audio_face_and_reference():
    x = torch.randn(2, 4, 3, 2, 2)
    audio, face = torch.randn(2, 3, 5, 8), torch.randn(2, 6, 1, 2, 2)

    def denoiser(latents, timestep, audio_rows, face_rows, with_reference):
        assert latents.shape[0] == 4 and with_reference.tolist() == [False, False, True, True]
        assert audio_rows[:2].abs().sum() == 0 and face_rows[:2].abs().sum() == 0
        assert torch.equal(audio_rows[2:], audio) and torch.equal(face_rows[2:], face)
        return torch.zeros_like(latents)

    sample(denoiser, x, audio, face, replace(NORMAL, steps=2, rotation=0))


def test_pseudo_velocity_is_v_up_to_rounding():
    sched = make_scheduler()
    x, v = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    for t in (999, 832, 166, 1):
        pv = pseudo_velocity(v, x, sched.alphas_cumprod, torch.tensor(t))
        assert (pv - v).abs().max() < 1e-4


def test_held_frames_come_out_unchanged_and_shape_the_rest():
    """Held frames end exactly at their clean latents; a denoiser that mixes frames makes the other
    frames depend on them (so the hold is what carries the previous segment over)."""
    torch.manual_seed(0)
    x = initial_latents((1, 4, 8, 2, 2), torch.Generator().manual_seed(1))
    held = Held(latents=torch.randn(1, 4, 3, 2, 2), noise=torch.randn(1, 4, 3, 2, 2))

    def mixing(latents, timestep, audio, face, with_reference):  # a "temporal layer": every frame sees the mean
        return latents - latents.mean(dim=2, keepdim=True)

    audio = torch.zeros(1, 8, 1, 1)
    out = sample(mixing, x, audio, torch.zeros(1, 1, 1, 1, 1), replace(ACC, rotation=0), held=held)
    assert torch.equal(out[:, :, :3], held.latents)
    other = sample(mixing, x, audio, torch.zeros(1, 1, 1, 1, 1), replace(ACC, rotation=0),
                   held=Held(held.latents + 1, held.noise))
    assert (other[:, :, 3:] - out[:, :, 3:]).abs().max() > 1e-3
