"""EchoMimic v1's sampling loop over any denoiser: context windows, guidance, held frames.

The loop of EchoMimic's own pipelines (github antgroup/echomimic, pipeline_echo_mimic[_acc].py), written
over an abstract denoiser so it can be tested without a model and shared by `generate`, `serve` and
`emo-stream parity`:

- DDIM (diffusers), v-prediction, zero-SNR rescaled linear betas, trailing spacing (`make_scheduler`);
- initial latents = randn clamped to [-1.5, 1.5] (`initial_latents`);
- uniform closed-loop context windows of `context_frames` with `context_overlap` (`context_windows`),
  shifted by 2 frames more at every step (`rotated`), window outputs averaged per frame, guidance
  applied after averaging; the unconditional branch drops audio, face feature and reference together;
- the acc pipeline's x0 -> pseudo-velocity round trip (`pseudo_velocity`), and the normal pipeline's
  quirk of summing overlapping windows without guidance (`sum_unguided_overlaps`, for parity only).

On top, for live streaming (EchoMimic has no motion frames): `Held` frames. The first k frames of a
segment are the last k frames of the previous one; their latents are replaced at every step by their
known clean latents re-noised to that step's level with a fixed noise (inpainting-style), and equal the
clean latents at the end. Temporal attention then makes the new frames continue the held ones
(docs/streaming.md, "EchoMimic segments").

Denoiser contract (`EchoDenoiser`): rows are [unconditional rows, conditional rows] when guidance > 1,
else conditional rows only; row r belongs to session r % B. The sampler zeroes the audio tokens and face
features of unconditional rows itself; the denoiser only has to skip the reference for rows whose
`with_reference` is False.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from emo_stream.execution import step_timesteps, to_device

# EchoMimic's configs/inference/inference_v2.yaml noise_scheduler_kwargs (+ diffusers' defaults it relies on)
SCHEDULER_CONFIG: dict = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                              clip_sample=False, steps_offset=1, prediction_type="v_prediction",
                              rescale_betas_zero_snr=True, timestep_spacing="trailing")


class EchoDenoiser(Protocol):
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor, face: torch.Tensor,
                 with_reference: torch.Tensor) -> torch.Tensor:
        """latents (R, 4, f, h, w), timestep (scalar), audio tokens (R, f, tokens, dim), face feature
        (R, C, 1, h, w), with_reference (R,) bool -> v-prediction (R, 4, f, h, w)."""


@dataclass(frozen=True)
class EchoSampling:
    """How to sample. Defaults: the published acc run (6 steps, no guidance)."""

    steps: int = 6
    guidance: float = 1.0               # > 1: classifier-free guidance (the normal weights use 2.5)
    context_frames: int = 12
    context_overlap: int = 3
    rotation: int = 2                   # frames the windows shift by at each step (EchoMimic: 2; live: 0)
    pseudo_velocity: bool = True        # acc pipeline: v -> x0 -> velocity wrt t=-1 (equal up to rounding)
    sum_unguided_overlaps: bool = False  # normal pipeline without guidance: overlaps summed, not averaged
    latent_clamp: float = 1.5           # initial noise clamped to +-this (EchoMimic's prepare_latents)

    def validate(self) -> "EchoSampling":
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {self.steps})")
        if not self.guidance >= 0:
            raise ValueError(f"guidance must be a number >= 0 (got {self.guidance})")
        if self.context_frames < 1 or not 0 <= self.context_overlap < self.context_frames:
            raise ValueError(f"need context_frames >= 1 and 0 <= context_overlap < context_frames "
                             f"(got {self.context_frames}, {self.context_overlap})")
        return self

    @property
    def uses_guidance(self) -> bool:
        return self.guidance > 1.0  # as the pipelines decide it


ACC = EchoSampling()
# the normal weights; its pipeline sums overlaps when guidance <= 1 (a bug we do not copy: parity sets the flag)
NORMAL = EchoSampling(steps=30, guidance=2.5, pseudo_velocity=False)


def make_scheduler(**overrides):
    """A fresh DDIMScheduler configured as EchoMimic's inference config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SCHEDULER_CONFIG, **overrides})


def context_windows(num_frames: int, size: int, overlap: int) -> list[list[int]]:
    """EchoMimic's `uniform` context schedule at stride 1, closed loop: one window when the video fits,
    else windows starting every size - overlap frames, the last ones wrapping around to frame 0."""
    if num_frames <= size:
        return [list(range(num_frames))]
    return [[(j + e) % num_frames for e in range(size)] for j in range(0, num_frames, size - overlap)]


def rotated(windows: list[list[int]], step_index: int, shift: int, num_frames: int) -> list[list[int]]:
    """The windows of step `step_index`: every frame index moved by shift * step_index, modulo the length."""
    return [[(f + shift * step_index) % num_frames for f in w] for w in windows]


def initial_latents(shape: tuple[int, ...], generator: torch.Generator | None, clamp: float = 1.5,
                    init_noise_sigma: float = 1.0) -> torch.Tensor:
    """randn on the generator's device, clamped (EchoMimic's prepare_latents), float32."""
    device = generator.device if generator is not None else "cpu"
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return x.clamp(-clamp, clamp) * init_noise_sigma


def pseudo_velocity(v: torch.Tensor, x: torch.Tensor, alphas_cumprod: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """The acc pipeline's round trip: x0 from v, then the velocity that jumps from x_t to x0 (t_prev = -1),
    with the same arithmetic as its step_func (so rounding matches). `t` a host int in the sampling loop
    (indexing with a device scalar would read it back to the host)."""
    a = alphas_cumprod[t if isinstance(t, int) else t.long()].to(torch.float32)
    a_t, b_t = (a ** 0.5).to(x.dtype), ((1 - a) ** 0.5).to(x.dtype)
    a_s, b_s = torch.ones_like(a_t), torch.zeros_like(b_t)
    x0 = a_t * x - b_t * v
    return (x0 - (a_s * a_t + b_s * b_t) * x) / (b_s * a_t - a_s * b_t)


@dataclass
class Held:
    """Frames at the start of the clip whose clean latents are known (the previous segment's last k)."""

    latents: torch.Tensor   # (B, 4, k, h, w) clean latents
    noise: torch.Tensor     # (B, 4, k, h, w) the fixed noise they are re-noised with at every step

    @property
    def frames(self) -> int:
        return self.latents.shape[2]


def sample(denoiser: EchoDenoiser, latents: torch.Tensor, audio: torch.Tensor, face: torch.Tensor,
           settings: EchoSampling = ACC, *, scheduler=None, held: Held | None = None,
           on_step: Callable[[int, torch.Tensor], None] | None = None,
           on_call: Callable[[], None] | None = None) -> torch.Tensor:
    """Denoise `latents` (B, 4, F, h, w, from initial_latents) into clean latents.

    audio (B, F, tokens, dim) tokens per frame; face (B, C, 1, h, w) face-locator feature.
    held: the first k frames are held (see module doc); they come out equal to held.latents.
    on_step(i, model_output) sees the averaged, guided v of each step (parity); on_call() is called
    after every denoiser call (progress bars).
    """
    settings.validate()
    sched = scheduler if scheduler is not None else make_scheduler()
    timesteps = step_timesteps(sched, settings.steps, latents.device)
    batch, frames = latents.shape[0], latents.shape[2]
    if audio.shape[:2] != (batch, frames):
        raise ValueError(f"audio tokens cover {tuple(audio.shape[:2])} (batch, frames), latents {batch, frames}")
    if held is not None and held.latents.shape[:2] + held.latents.shape[3:] != latents.shape[:2] + latents.shape[3:]:
        raise ValueError(f"held latents {tuple(held.latents.shape)} do not fit latents {tuple(latents.shape)}")
    cfg = settings.uses_guidance
    rows = 2 if cfg else 1
    audio_rows = torch.cat([torch.zeros_like(audio), audio]) if cfg else audio
    face_rows = torch.cat([torch.zeros_like(face), face]) if cfg else face
    # a host mask: the denoiser splits its rows with it without reading the device back
    with_reference = torch.tensor([False] * batch * (rows - 1) + [True] * batch)
    # the schedule's table on the device once (add_noise would move it there inside the loop otherwise)
    sched.alphas_cumprod = alphas = to_device(sched.alphas_cumprod, latents.device)
    base = context_windows(frames, settings.context_frames, settings.context_overlap)
    # every step's windows as frame indices before the loop: slices where contiguous (always live), else
    # index tensors copied now (non-blocking), not from Python lists inside the loop
    plan = [[_frame_index(w, latents.device) for w in rotated(base, i, settings.rotation, frames)]
            for i in range(len(timesteps))]
    x = latents
    # the per-step loop: no host sync in it (tests/test_device_discipline.py counts them)
    for i, (t, t_dev) in enumerate(timesteps):
        if held is not None:
            x = _hold(x, held, sched, t_dev)
        v_sum = torch.zeros((batch * rows, *x.shape[1:]), device=x.device, dtype=x.dtype)
        counter = torch.zeros((1, 1, frames, 1, 1), device=x.device, dtype=x.dtype)
        for window in plan[i]:
            inp = x[:, :, window].repeat(rows, 1, 1, 1, 1)
            inp = sched.scale_model_input(inp, t)
            v = denoiser(inp, t_dev, audio_rows[:, window], face_rows, with_reference)
            if settings.pseudo_velocity:
                v = pseudo_velocity(v, inp, alphas, t)
            v_sum[:, :, window] = v_sum[:, :, window] + v
            counter[:, :, window] = counter[:, :, window] + 1
            if on_call is not None:
                on_call()
        if cfg:
            v_uncond, v_cond = (v_sum / counter).chunk(2)
            v_out = v_uncond + settings.guidance * (v_cond - v_uncond)
        elif settings.sum_unguided_overlaps:
            v_out = v_sum
        else:
            v_out = v_sum / counter
        if on_step is not None:
            on_step(i, v_out)
        x = sched.step(v_out, t, x, eta=0.0, return_dict=False)[0]
    if held is not None:
        x = torch.cat([held.latents.to(x.dtype), x[:, :, held.frames:]], dim=2)
    return x


def _frame_index(window: list[int], device: torch.device) -> slice | torch.Tensor:
    """A window's frame indices: a slice when they are consecutive, else an index tensor on `device`."""
    if window == list(range(window[0], window[0] + len(window))):
        return slice(window[0], window[0] + len(window))
    return to_device(torch.tensor(window), device)


def _hold(x: torch.Tensor, held: Held, sched, t: torch.Tensor) -> torch.Tensor:
    """x with its first k frames replaced by the held clean latents noised to level t."""
    noisy = sched.add_noise(held.latents.to(x.dtype), held.noise.to(x.dtype), t.reshape(1))
    return torch.cat([noisy, x[:, :, held.frames:]], dim=2)


def with_steps(settings: EchoSampling, steps: int | None = None, guidance: float | None = None) -> EchoSampling:
    """settings with steps / guidance overridden where given."""
    return replace(settings, steps=settings.steps if steps is None else int(steps),
                   guidance=settings.guidance if guidance is None else float(guidance))
