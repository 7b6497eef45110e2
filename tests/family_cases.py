"""Tiny random-weight instances of every model family with a GPU-style run, for the device checks
(tests/test_device_discipline.py, tests/test_compile.py, bench/dtypes.py).

    case = CASES["emo"]
    backend = case.backend(device="meta", dtype=torch.float32, steps=2)
    jobs = case.jobs(backend, sessions=2)           # SegmentJobs with features on the backend's device
    case.run_segment(backend, jobs)                 # the segment loop as the engine runs it
    fn, x, t = case.step(backend, jobs)             # the per-step denoiser call: fn(x, t) -> prediction

Each family is built at a size where its tiny UNet still has >= 2x2 latents at the bottom level.
Families: emo, echomimic, hallo (diffusion loops: steps per segment), musetalk (no loop: one UNet call at t = 0
per frame, every session's frames in one batch, then the batched VAE decode and the paste into the base
frames, all on the device). The preview family is not here: it is a weight-free numpy/PIL animator that runs
on the CPU by design (no tensor, no device; docs/performance.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from emo_stream.backend import SegmentJob


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1)


def _seeded(fn, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _place(model, device, dtype):
    return model.eval().to(device=torch.device(device), dtype=dtype)


# ---- EMO ----------------------------------------------------------------------------------------------
def _emo_model():
    from emo_stream.families.emo.backend import load_model

    m = load_model("tiny", device=torch.device("cpu"))
    with torch.no_grad():   # the new layers start at zero: make them matter (as tests/test_fast_paths.py)
        g = torch.Generator().manual_seed(1)
        for name, p in m.named_parameters():
            if ".processor." in name or "proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def emo_backend(device="cpu", dtype=torch.float32, steps=2, model=None, **kw):
    from emo_stream.families.emo.backend import EmoBackend

    m = _place(copy.deepcopy(model) if model is not None else _emo_model(), device, dtype)
    return EmoBackend(m, size=64, steps=steps, decoder="taesd", **kw)


def emo_jobs(backend, sessions=1, frames=8):
    m = backend.model
    img = np.full((backend.size, backend.size, 3), 128, np.uint8)
    img[16:48, 20:44] = 200
    av = backend.avatar_from_crop(img, np.array([16, 16, 48, 48], np.float32))
    g = torch.Generator().manual_seed(2)
    out = []
    for s in range(sessions):
        feats = torch.randn(frames, 5, m.config.audio_feature_dim, generator=g).to(m.device, m.dtype)
        out.append(SegmentJob(av, backend.new_state(av, seed=s), feats, frames))
    return out


def emo_step(backend, jobs):
    m = backend.model
    dev, dt = m.device, m.dtype
    av = jobs[0].state.avatar
    b = len(jobs)
    from emo_stream.families.emo.reference_net import ReferenceFeatures

    ref = ReferenceFeatures.cat([av.reference] * b)
    motion = {k: torch.cat([v] * b) for k, v in av.motion0.items()}
    feats = torch.stack([j.features for j in jobs])
    cond = m.condition(ref, feats, torch.cat([av.face_mask] * b), None, motion, cache=True)
    h = backend.size // m.config.latent_factor
    x = torch.randn(b, 4, jobs[0].num_frames, h, h, generator=torch.Generator().manual_seed(3)).to(dev, dt)
    t = torch.full((), 500, dtype=torch.long, device=dev)
    return (lambda x, t: m.predict_noise(x, t, cond)), x, t


# ---- EchoMimic v1 --------------------------------------------------------------------------------------
def _echo_model(weights_set="acc"):
    from emo_stream.families.echomimic.testing import live_model, tiny_config

    model = live_model(tiny_config(weights_set=weights_set))
    model.vae = _seeded(_tiny_vae)
    return model.eval()


def echo_backend(device="cpu", dtype=torch.float32, steps=2, model=None, **kw):
    from emo_stream.families.echomimic.backend import EchoMimicBackend, ModelParts

    m = _place(copy.deepcopy(model) if model is not None else _echo_model(), device, dtype)
    return EchoMimicBackend(ModelParts(m), size=128, fps=25, steps=steps, live_overlap=4, segment_frames=8, **kw)


def echo_jobs(backend, sessions=1, frames=8):
    m = backend.model
    img = np.full((backend.size, backend.size, 3), 128, np.uint8)
    img[32:96, 40:88] = 200
    av = backend.avatar_from_crop(img, np.array([32, 32, 96, 96], np.float32))
    g = torch.Generator().manual_seed(2)
    return [SegmentJob(av, backend.new_state(av, seed=s), torch.randn(frames, 50, 384, generator=g).to(m.device, m.dtype),
                       frames) for s in range(sessions)]


def echo_step(backend, jobs):
    parts = backend.model
    m = parts.model
    dev, dt = m.device, m.dtype
    b, f = len(jobs), jobs[0].num_frames
    av = jobs[0].state.avatar
    bank = {k: torch.cat([v] * b) for k, v in av.bank.items()}
    audio = torch.stack([j.features for j in jobs])
    face = torch.cat([av.face] * b)
    h = backend.size // 8
    x = torch.randn(b, 4, f, h, h, generator=torch.Generator().manual_seed(3)).to(dev, dt)
    t = torch.full((), 500, dtype=torch.long, device=dev)
    return (lambda x, t: m.denoise(x, t, audio, face, None, bank)), x, t


# ---- Hallo ---------------------------------------------------------------------------------------------
HALLO_TINY = dict(channels=[32] * 4, layers=1, heads=8, cross_dim=32, audio_dim=32, id_tokens=4, wav_layers=2,
                  wav_heads=2, wav_inter=64, proj_inter=64, context_tokens=32, motion_heads=8, pe_max_len=32,
                  image=128, clip_length=8, motion_frames=2, steps=2)


def _hallo_model():
    from emo_stream.families.hallo.config import HalloConfig
    from emo_stream.families.hallo.model import HalloModel
    from tests.golden_sets import HALLO_SPEC, hallo_case

    cfg = HalloConfig.from_case(hallo_case({**copy.deepcopy(HALLO_SPEC), **HALLO_TINY}))

    def build():
        model = HalloModel(cfg, None, vae=_tiny_vae())
        with torch.no_grad():   # every weight live (zero-initialised convs too)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model
    return _seeded(build).eval()


def hallo_backend(device="cpu", dtype=torch.float32, steps=2, model=None, **kw):
    from emo_stream.families.hallo.backend import HalloBackend

    # a fresh (seeded: the same weights) model every time: Hallo's denoiser hooks are closures over the module
    # that registered them, so a deepcopy of HalloModel would still read the original's per-call state
    m = _place(_hallo_model(), device, dtype)
    return HalloBackend(m, size=128, fps=25, steps=steps, **kw)


def hallo_jobs(backend, sessions=1, frames=8):
    cfg = backend.model.config
    rng = np.random.default_rng(0)
    lm = np.concatenate([rng.uniform([30, 40], [98, 110], (48, 2)), rng.uniform([52, 86], [76, 98], (20, 2))])
    img = np.full((backend.size, backend.size, 3), 128, np.uint8)
    av = backend.avatar_from_crop(img, lm, np.zeros(512, np.float32))
    ap = cfg.audioproj
    g = torch.Generator().manual_seed(2)
    return [SegmentJob(av, backend.new_state(av, s),
                       torch.randn(frames, ap["seq_len"], ap["blocks"], ap["channels"], generator=g).to(
                           backend.device, backend.dtype), frames) for s in range(sessions)]


def hallo_step(backend, jobs):
    from emo_stream.families.hallo.model import ClipInputs

    m, av = backend.model, jobs[0].state.avatar
    dev, dt = backend.device, backend.dtype
    f = jobs[0].num_frames
    nm = m.config.motion_frames
    h = backend.size // 8
    g = torch.Generator().manual_seed(3)
    clip = ClipInputs(ref_latents=torch.randn(1 + nm, 4, h, h, generator=g).to(dev, dt), face_tokens=av.face_tokens,
                      uncond_face_tokens=av.uncond_face_tokens, audio_tokens=m.audio_tokens(jobs[0].features),
                      masks=av.masks, face_feature=av.face_feature.repeat(1, 1, f, 1, 1))
    m.prepare_reference(clip, guided=False)
    x = torch.randn(1, 4, f, h, h, generator=g).to(dev, dt)
    t = torch.full((), 500, dtype=torch.long, device=dev)
    return (lambda x, t: m.denoise(x, t, clip, guided=False)), x, t


# ---- MuseTalk 1.5 ---------------------------------------------------------------------------------------
MUSETALK_SIZE, MUSETALK_BOX = 128, (32, 40, 96, 104)


def _musetalk_model():
    from emo_stream.families.musetalk.testing import random_model

    # the tiny UNet (3 levels) at a 64 px crop: 8x8 latents, 2x2 at the bottom
    return random_model(full=False, seed=0, crop_size=64)


def musetalk_backend(device="cpu", dtype=torch.float32, steps=1, model=None, **kw):
    """steps: ignored (MuseTalk has no sampling loop: one UNet call at t = 0 per frame)."""
    from emo_stream.families.musetalk.backend import MuseTalkBackend

    m = copy.deepcopy(model) if model is not None else _musetalk_model()
    m = m.to_runtime(torch.device(device), dtype)
    kw = {"segment_frames": 8, "portrait_motion": "still", "cache_dir": "", **kw}
    return MuseTalkBackend(m, size=MUSETALK_SIZE, fps=25, **kw)


def musetalk_jobs(backend, sessions=1, frames=8):
    """Sessions on one 3-frame avatar (built on the backend's device), each with its own audio prompts."""
    from emo_stream.families.musetalk.testing import synthetic_avatar

    m = backend.model
    img = np.full((backend.size, backend.size, 3), 128, np.uint8)
    img[40:104, 32:96] = 200
    av = synthetic_avatar(m, img, MUSETALK_BOX, frames=3)
    cfg = m.config
    g = torch.Generator().manual_seed(2)
    tokens = cfg.steps_per_frame_window * cfg.whisper_layers
    return [SegmentJob(av, backend.new_state(av, seed=s),
                       torch.randn(frames, tokens, cfg.pe_dim, generator=g).to(m.device, m.dtype), frames)
            for s in range(sessions)]


def musetalk_step(backend, jobs):
    """The batched UNet call of the live path: every job's frames as rows (t is MuseTalk's fixed 0)."""
    m = backend.model
    rows = torch.cat([j.features for j in jobs])
    h = jobs[0].state.avatar.latents.shape[-1]
    x = torch.randn(rows.shape[0], 8, h, h, generator=torch.Generator().manual_seed(3)).to(m.device, m.dtype)
    t = torch.zeros((), dtype=torch.long, device=m.device)
    return (lambda x, t: m.denoise(x, rows)), x, t


def musetalk_segment(backend, jobs):
    """MuseTalk's live segment: the batched UNet (denoise) then the batched decode and paste (decode)."""
    return backend.decode(jobs, backend.denoise(jobs))


@dataclass(frozen=True)
class FamilyCase:
    name: str
    model: Callable[[], Any]            # a tiny random fp32 CPU model (pass to backend(model=) to reuse it)
    backend: Callable[..., Any]
    jobs: Callable[..., list]
    step: Callable[..., tuple]
    batched: bool = True                # sessions share one denoiser call (Hallo runs them one by one)
    segment: Callable[..., Any] | None = None   # the segment loop, when not denoise (or generate) alone
    steps: bool = True                  # a sampling loop of `steps` denoiser calls per segment (MuseTalk: none)

    def run_segment(self, backend, jobs):
        """The segment loop as the engine calls it (denoise when the backend splits it from decode)."""
        if self.segment is not None:
            return self.segment(backend, jobs)
        return backend.denoise(jobs) if hasattr(backend, "denoise") else backend.generate(jobs)


CASES = {
    "emo": FamilyCase("emo", _emo_model, emo_backend, emo_jobs, emo_step),
    "echomimic": FamilyCase("echomimic", _echo_model, echo_backend, echo_jobs, echo_step),
    "hallo": FamilyCase("hallo", _hallo_model, hallo_backend, hallo_jobs, hallo_step, batched=False),
    "musetalk": FamilyCase("musetalk", _musetalk_model, musetalk_backend, musetalk_jobs, musetalk_step,
                           segment=musetalk_segment, steps=False),
}


class Models(dict):
    """Each family's tiny fp32 model, built on first use: a test module holds one (a module-scoped fixture), so
    a family is built once per module, whatever the tests selected."""

    def __missing__(self, family):
        torch.set_num_threads(1)
        self[family] = CASES[family].model()
        return self[family]
