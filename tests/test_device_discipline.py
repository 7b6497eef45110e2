"""What a first GPU run would trip on, proven on the CPU, for every model family (tests/family_cases.py):

- device discipline: the segment loop (and so the per-step denoiser) runs with every weight and input on the
  meta device; a tensor made on the CPU inside a forward pass then fails as it would on CUDA;
- no host sync in the per-step loop: tests/host_sync.py counts what would block the host on a GPU; the
  counts of a 1-step and a 2-step segment must be equal (so a step adds none), and the per-segment ones that
  remain are exactly the documented ones (docs/performance.md, "Host syncs");
- bf16 and fp16 on the CPU: finite, close to fp32 (bench/dtypes.py records the errors), with the reference
  fp16 casts that EchoMimic and Hallo need kept.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from emo_stream.execution import to_device
from tests.family_cases import CASES, Models
from tests.host_sync import ASYNC_COPY, count_host_syncs

FAMILIES = sorted(CASES)
# the syncs left per segment (denoise; Hallo's generate also decodes): kind -> count. Hallo's decoded frames
# leave the device once per segment (its motion frames are those pixels, re-encoded next segment)
PER_SEGMENT = {"emo": {}, "echomimic": {}, "hallo": {"device->host copy": 1},
               # MuseTalk's segment is denoise + decode: the pasted frames leave the device once, as one batch
               "musetalk": {"device->host copy": 1}}
# max |low - fp32| / max |fp32| of one denoiser call at the tiny sizes (measured: bench/results/dtypes-cpu.json)
TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02}


@pytest.fixture(scope="module")
def models():
    return Models()


def test_the_probe_counts_what_blocks_a_gpu():
    x = torch.ones(4, device="meta")
    with count_host_syncs() as log:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[[0, 2]]
        torch.tensor([1.0], device="meta")
        torch.ones(2).to("meta")
        x.cpu()
    kinds = Counter(kind.split(" (")[0] for kind, _ in log.syncs().elements())
    assert kinds == {"device value read on the host": 2, "data-dependent shape": 1, "host->device copy": 3,
                     "device->host copy": 1}, kinds
    with count_host_syncs() as log:   # none of these waits for the device
        to_device(torch.ones(2), torch.device("meta"))
        x * torch.tensor(2.0)        # a host 0-d tensor is a kernel argument
        x[1:3]
        torch.full((2,), 1.0, device="meta")
        x.repeat_interleave(2, dim=0)
    assert log.total() == 0 and [k for k, _ in log.events] == [ASYNC_COPY]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_segment_loop_runs_on_meta_without_per_step_syncs(family, models):
    case = CASES[family]
    seen, sessions = {}, 2 if case.batched else 1
    for scale in (1, 2):
        if case.steps:      # a diffusion loop: 1 then 2 denoising steps per segment
            backend = case.backend(device="meta", steps=scale, model=models[family])
            frames = 8
        else:               # MuseTalk has no steps: its inner work is per frame (a UNet row, a decode, a paste),
            # in calls of 4 frames: 4 then 8 frames per segment, so also 1 then 2 calls of each kind
            backend = case.backend(device="meta", model=models[family], max_batch_frames=4)
            frames = 4 * scale
        jobs = case.jobs(backend, sessions=sessions, frames=frames)
        runs = []
        for _ in range(2):   # the first segment, then one continuing it (motion / held frames)
            with count_host_syncs() as log:
                out = case.run_segment(backend, jobs)
            runs.append(Counter(log.events))
        assert len(out) == sessions
        if isinstance(out[0], torch.Tensor):   # latents stay on the device, (1, 4, frames, h, w)
            assert out[0].device.type == "meta" and out[0].shape[:3] == (1, 4, frames)
        else:                                  # decoded frames
            assert out[0].shape == (frames, backend.size, backend.size, 3)
        seen[scale] = runs
    assert seen[1] == seen[2], (f"a denoising step (MuseTalk: a frame, a batched call) adds host syncs or copies: "
                                f"{seen[2]} vs {seen[1]}")
    for run in seen[1]:
        syncs = Counter()
        for (kind, _where), n in run.items():
            if kind != ASYNC_COPY:
                syncs[kind.split(" (")[0]] += n
        assert dict(syncs) == PER_SEGMENT[family], run


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_low_precision_on_the_cpu(family, dtype, models):
    case = CASES[family]
    ref = case.backend(dtype=torch.float32, model=models[family])
    fn, x, t = case.step(ref, case.jobs(ref, sessions=2 if case.batched else 1))
    want = fn(x, t).float()
    low = case.backend(dtype=dtype, model=models[family])
    jobs = case.jobs(low, sessions=2 if case.batched else 1)
    fn, x, t = case.step(low, jobs)
    got = fn(x, t)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = float((got.float() - want).abs().max() / want.abs().max())
    assert err < TOLERANCE[dtype], f"{family} {dtype}: relative error {err:.3g} against fp32"
    if family == "musetalk":   # its segment ends in uint8 pixels (a NaN would not show): the float stages
        res = low.denoise(jobs)
        assert res.latents.dtype == dtype and torch.isfinite(res.latents).all()
        m = low.model
        pixels = m.vae.decode((res.latents / m.scaling_factor).to(m.vae.dtype)).sample
        assert pixels.dtype == dtype and torch.isfinite(pixels).all()
    out = case.run_segment(low, jobs)     # the whole segment loop too
    assert all(np.isfinite(o.float().numpy() if isinstance(o, torch.Tensor) else o).all() for o in out)
    # the reference casts the published code does even in fp32 runs are kept
    if family == "echomimic":
        assert all(v.dtype == torch.float16 for v in jobs[0].state.avatar.bank.values())
    if family == "hallo":
        for slot in low.model.denoising_unet.slots.values():
            assert torch.equal(slot.bank, slot.bank.half().to(slot.bank.dtype))


def test_capacity_comes_from_the_device_memory_only_on_cuda():
    """serve / worker without --max-sessions: the default off CUDA, else free memory / the counted profile."""
    from emo_stream.blocks.memory import GIB, MemoryProfile, device_capacity

    class Cpu:
        device = torch.device("cpu")
    assert device_capacity(Cpu(), max_batch=4)[0] == 4
    p = MemoryProfile("x", 512, "bfloat16", weights=10 * GIB, session=GIB // 2, activations={1: GIB, 4: 4 * GIB})
    assert p.activation_bytes(8) == 8 * GIB                       # linear through the measured batches
    # 24 GiB: 21.6 usable - 10 weights - 4 activations = 7.6 GiB -> 15 sessions of 0.5 GiB
    assert p.sessions(24 * GIB, max_batch=4) == 15
    assert p.sessions(14 * GIB, max_batch=4, loaded=True) == int((14 * 0.9 - 4) / 0.5)


@pytest.mark.timeout(900)
@torch.no_grad()
def test_musetalk_audio_and_offline_loop_on_meta(models):
    """MuseTalk's other per-segment device work: the live whisper window (mel computed on the device, encoder,
    prompts) blocks nothing; the offline loop (whole-file whisper, then chunks of clip_frames) leaves the device
    once per chunk (its frames), whatever the number of chunks."""
    case = CASES["musetalk"]
    backend = case.backend(device="meta", model=models["musetalk"], clip_frames=4)
    spf = 640
    audio = np.random.default_rng(0).standard_normal(40 * spf).astype(np.float32) * 0.1
    with count_host_syncs() as log:
        feats = backend.encode_audio(audio, 20 * spf, 8)
    assert feats.device.type == "meta" and feats.shape[0] == 8
    assert log.total() == 0, log.syncs()
    with count_host_syncs() as log:
        idle = backend._silent(8)            # the idle prompt: whisper over silence, once per backend
    assert idle.device.type == "meta" and log.total() == 0, log.syncs()
    avatar = case.jobs(backend, sessions=1)[0].state.avatar
    for seconds, chunks in ((0.32, 2), (0.64, 4)):   # 8 and 16 frames: 2 and 4 chunks of 4
        with count_host_syncs() as log:
            clips = list(backend.render_video(avatar, audio[: int(seconds * 16000)]))
        assert len(clips) == chunks and clips[0][0].shape == (4, backend.size, backend.size, 3)
        kinds = Counter(kind.split(" (")[0] for kind, _ in log.syncs().elements())
        # the whole file's mel is made on the host by MuseTalk's extractor (its copy in is pinned, async)
        assert kinds == {"device->host copy": chunks}, log.syncs()


@torch.no_grad()
def test_musetalk_device_mel_equals_the_extractor():
    """The live path's mel on the device (audio.device_log_mel) is the feature extractor's own torch path op for op:
    on the CPU the two are equal to the bit, for a short window and a full 30 s one."""
    from emo_stream.families.musetalk.audio import device_log_mel, log_mel
    from emo_stream.families.musetalk.loader import build_extractor

    extractor = build_extractor({"feature_size": 80})
    rng = np.random.default_rng(1)
    for n in (16000 * 3 + 123, 16000 * 30):
        wav = (rng.standard_normal(n) * 0.1).astype(np.float32)
        want = log_mel(extractor, wav)
        got = device_log_mel(extractor, wav, torch.device("cpu"))
        assert got.shape == want.shape == (1, 80, 3000)
        assert torch.equal(got, want)
