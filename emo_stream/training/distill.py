"""`emo-stream train --stage distill`: a teacher checkpoint -> a few-step student that needs no guidance.

Method: progressive distillation (Salimans & Ho 2022) in one round of ratio teacher_steps / steps, with the
teacher's classifier-free guidance baked into the targets (Meng et al. 2023, "On distillation of guided
diffusion models"). For the student's DDIM timestep t_i (the same trailing schedule EmoBackend samples with),
a training clip is noised to t_i; the teacher runs its own guided DDIM sampler from there to the student's next
timestep t_{i+1} (teacher_steps / steps sub-steps, each a conditional and an unconditional pass), landing at
z'. The student must reach z' in ONE deterministic DDIM step without guidance: its target noise is the one
that makes that step land on z',

    eps* = (z' - (a'/a) z) / (s' - a' s / a),   a, s = sqrt(abar), sqrt(1 - abar) at t_i;  a', s' at t_{i+1}

and the loss is the mean squared error to eps*, the same objective as the base training. Why this rather than
latent consistency distillation: the targets are deterministic outputs of the sampler we ship (DDIM), so the
student is sampled exactly as the teacher (same scheduler, no LCM re-noising, no EMA target network, no skip
schedule to tune) and it converges in a few hundred steps on a CPU for the tiny proof (bench/learn_distill.py).

The student starts from the teacher's weights. Optionally it is smaller: `distill.student_layers_per_block`
removes (resnet, attention, temporal) layers per UNet level in the ReferenceNet and the backbone, as BK-SDM
(Kim et al. 2023) does for SD: down blocks keep their first layers, up blocks their first and their last
(whose skip input has the level's width), so every kept weight is copied with its shape; the distillation
then teaches the slimmer network the teacher's sampler. The sd15 live default (configs/models/sd15_live.yaml)
is that student with one layer per level (bench/flops.py).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
from torch import nn

from emo_stream.errors import ConfigError
from emo_stream.families.emo.model import Conditioning, EmoModel

log = logging.getLogger(__name__)

# a layer of the ReferenceNet's or the backbone's UNet (not the VAE's, which keeps its layers)
_LAYER = re.compile(r"^(?P<pre>(?:reference_net|backbone)\.unet\.(?P<part>down_blocks|up_blocks)\.\d+\."
                    r"(?:resnets|attentions|motion_modules)\.)(?P<k>\d+)(?P<post>\.)")


def ddim_timesteps(steps: int, noise=None) -> list[int]:
    """The sampler's timesteps for `steps` steps (EmoBackend's DDIM with the model's noise config, default
    SD1.5's with trailing spacing), then the 'clean' index (DDIMScheduler's previous-timestep rule)."""
    from diffusers import DDIMScheduler

    from emo_stream.families.emo.config import NoiseConfig

    noise = noise or NoiseConfig()
    sched = DDIMScheduler(**noise.scheduler_kwargs())
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    ratio = noise.num_train_timesteps // steps
    for a, b in zip(ts, ts[1:]):
        if a - ratio != b:
            raise ConfigError(f"{steps} steps: DDIM timesteps {ts} are not evenly spaced")
    return ts + [ts[-1] - ratio]


def student_config(teacher_cfg, layers_per_block: int | None, steps: int):
    """The student's model config: the teacher's, optionally with fewer layers per level, sampling set to
    `steps` guidance-free DDIM steps (TAESD as the decoder when the model has one)."""
    cfg = copy.deepcopy(teacher_cfg)
    if layers_per_block is not None:
        have = int(cfg.unet.get("layers_per_block", 2))
        if not 1 <= layers_per_block <= have:
            raise ConfigError(f"distill.student_layers_per_block must be in 1..{have} (the teacher's), "
                              f"got {layers_per_block}")
        cfg.unet["layers_per_block"] = layers_per_block
        cfg.motion_adapter["motion_layers_per_block"] = layers_per_block
        if layers_per_block != have:
            cfg.name = f"{teacher_cfg.name}_student{layers_per_block}"
    cfg.sampling.steps = steps
    cfg.sampling.idle_steps = min(cfg.sampling.idle_steps, steps)
    cfg.sampling.guidance = 1.0
    cfg.sampling.scheduler = "ddim"
    if cfg.taesd is not None:
        cfg.sampling.decoder = "taesd"
    return cfg.validate()


def teacher_name(student_name: str, teacher_layers: int, student_layers: int) -> str:
    """A student parameter name -> the teacher's parameter it starts from (block removal, see module doc)."""
    if teacher_layers == student_layers:
        return student_name

    def sub(m: re.Match) -> str:
        k = int(m.group("k"))
        if m.group("part") == "up_blocks" and k == student_layers:  # up blocks have layers + 1: keep the last
            k = teacher_layers
        return f"{m.group('pre')}{k}{m.group('post')}"
    return _LAYER.sub(sub, student_name)


def init_student(teacher: EmoModel, layers_per_block: int | None, steps: int) -> EmoModel:
    """A student EmoModel initialised from the teacher (every parameter copied, shapes checked)."""
    cfg = student_config(teacher.config, layers_per_block, steps)
    student = EmoModel.build(cfg, empty=True)
    t_layers = int(teacher.config.unet.get("layers_per_block", 2))
    s_layers = int(cfg.unet.get("layers_per_block", 2))
    source = teacher.state_dict()
    state = {}
    for name, p in student.state_dict().items():
        src = teacher_name(name, t_layers, s_layers)
        if src not in source or source[src].shape != p.shape:
            raise ConfigError(f"student parameter {name}: no teacher parameter {src} of shape {tuple(p.shape)}")
        state[name] = source[src].detach().clone()
    student.load_state_dict(state, strict=True, assign=True)
    student.vae.register_to_config(scaling_factor=teacher.vae.config.scaling_factor)
    return student.to(teacher.device).eval()


class DistillModule(nn.Module):
    """Student (trained, `self.model`) + frozen teacher -> the distillation loss of one batch.

    The teacher is kept out of the module tree (not in checkpoints, not wrapped by DDP)."""

    def __init__(self, student: EmoModel, teacher: EmoModel, steps: int, teacher_steps: int, guidance: float,
                 motion_noise: float = 0.0):
        super().__init__()
        from emo_stream.training.model_adapter import TrainingModule

        if teacher_steps % steps:
            raise ConfigError(f"distill.teacher_steps ({teacher_steps}) must be a multiple of distill.steps ({steps})")
        noise = getattr(teacher.config, "noise", None)
        if noise is not None and noise.prediction_type != "epsilon":
            raise ConfigError(f"distill supports epsilon-prediction teachers; this one predicts {noise.prediction_type}")
        self.model = student
        self._teacher = [teacher.eval().requires_grad_(False)]
        self.steps, self.teacher_steps, self.guidance = steps, teacher_steps, float(guidance)
        self.motion_noise = motion_noise
        self.student_t = ddim_timesteps(steps, noise)   # t_0 .. t_{K-1}, then the 'clean' index (-1)
        self.teacher_t = ddim_timesteps(teacher_steps, noise)
        if not set(self.student_t) <= set(self.teacher_t):
            raise ConfigError(f"student timesteps {self.student_t} are not on the teacher's {self.teacher_t}")
        # latents / audio feature helpers and the noise schedule; in a list: the student is registered once
        self._base_ref = [TrainingModule(student, stage=2)]
        self.register_buffer("alphas_cumprod", self._base.alphas_cumprod.clone(), persistent=False)

    @property
    def _base(self):
        return self._base_ref[0]

    @property
    def teacher(self) -> EmoModel:
        return self._teacher[0]

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        self._base.train(mode)
        self.teacher.eval()
        return self

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at t; t = -1 is 'clean', DDIM's final step with set_alpha_to_one=False: abar[0]."""
        return self.alphas_cumprod[t.clamp(min=0)]

    def _ddim(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        a, a2 = self._abar(t).view(-1, 1, 1, 1, 1), self._abar(t_next).view(-1, 1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a2.sqrt() * x0 + (1 - a2).sqrt() * eps

    @torch.no_grad()
    def teacher_target(self, x: torch.Tensor, i: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """From x at student timestep index i (per sample), the teacher's guided DDIM sub-steps to index i + 1."""
        teacher, ratio = self.teacher, self.teacher_steps // self.steps
        both = Conditioning.cat(cond, cond.with_null_audio()) if self.guidance != 1.0 else cond
        tt = torch.tensor(self.teacher_t, device=x.device)
        for j in range(ratio):
            t, t_next = tt[i * ratio + j], tt[i * ratio + j + 1]
            inp = torch.cat([x, x]) if self.guidance != 1.0 else x
            eps = teacher.predict_noise(inp, torch.cat([t, t]) if self.guidance != 1.0 else t, both).float()
            if self.guidance != 1.0:
                e_c, e_u = eps.chunk(2)
                eps = e_u + self.guidance * (e_c - e_u)
            x = self._ddim(x, eps, t, t_next)
        return x

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator, cond_drop: float = 0.0
                ) -> torch.Tensor:
        base, student, teacher = self._base, self.model, self.teacher
        clean = base._latents(batch["frames"]).permute(0, 2, 1, 3, 4)     # (B, 4, F, h, w)
        motion = base._latents(batch["motion"]).permute(0, 2, 1, 3, 4)    # (B, 4, n, h, w)
        reference = base._latents(batch["reference"])
        b, frames = clean.shape[0], clean.shape[2]
        feats = base._audio_features(batch, frames)
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        i = torch.randint(0, self.steps, (b,), generator=generator).to(clean.device)
        if self.motion_noise:
            motion = motion + self.motion_noise * torch.randn(motion.shape, generator=generator).to(motion.device)
        st = torch.tensor(self.student_t, device=clean.device)
        t, t_next = st[i], st[i + 1]
        a = self._abar(t).view(b, 1, 1, 1, 1)
        z = a.sqrt() * clean + (1 - a).sqrt() * noise
        speed, mask = batch.get("speed"), batch["mask"]
        with torch.no_grad():
            t_ref = teacher.encode_reference(reference)
            t_cond = teacher.condition(t_ref, feats, mask, speed, teacher.encode_motion(motion))
            target_z = self.teacher_target(z, i, t_cond)
        train_ref = any(p.requires_grad for p in student.reference_net.parameters())
        with torch.set_grad_enabled(train_ref and torch.is_grad_enabled()):
            s_ref = student.encode_reference(reference)
            s_motion = student.encode_motion(motion)
        s_cond = student.condition(s_ref, feats, mask, speed, s_motion)
        eps = student.predict_noise(z, t, s_cond).float()
        a2 = self._abar(t_next).view(b, 1, 1, 1, 1)
        sa, sa2 = a.sqrt(), a2.sqrt()
        target_eps = (target_z - (sa2 / sa) * z) / ((1 - a2).sqrt() - sa2 * (1 - a).sqrt() / sa)
        return torch.nn.functional.mse_loss(eps, target_eps)


def build(cfg, device: torch.device | None = None) -> tuple[EmoModel, DistillModule, dict[str, Any]]:
    """(student, loss module, info) for a distill-stage TrainConfig."""
    from emo_stream.training import model_adapter as ma

    d = cfg.distill
    teacher = ma.load_model(d.teacher, cfg.model.options)
    if device is not None:
        teacher.to(device)
    student = init_student(teacher, d.student_layers_per_block, d.steps)
    guidance = float(teacher.config.sampling.guidance if d.guidance is None else d.guidance)
    module = DistillModule(student, teacher, d.steps, d.teacher_steps, guidance,
                           motion_noise=cfg.train.motion_noise)
    info = {"teacher": str(d.teacher), "teacher_steps": d.teacher_steps, "steps": d.steps, "guidance": guidance,
            "student_layers_per_block": int(student.config.unet.get("layers_per_block", 2))}
    log.info("distilling %s (%d guided steps, guidance %.2f) into a %d-step guidance-free student",
             d.teacher, d.teacher_steps, guidance, d.steps)
    return student, module, info
