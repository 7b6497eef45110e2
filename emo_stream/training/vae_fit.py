"""Fitting the VAE to a dataset, for models whose VAE is NOT pretrained (the random-weight `tiny` preset).

EMO keeps SD's VAE frozen; with a real sd15 model this is never needed. A tiny model built from a preset
has a random VAE whose decoder does not invert its encoder, so a diffusion model trained in its latent
space could never show anything recognisable. `train.vae_steps` fits it first (reconstruction + a small
KL term), on the training frames, then it is frozen as usual and saved with the checkpoint.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def fit_vae(vae, store, size: int, steps: int, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
            kl_weight: float = 1e-6, device: torch.device | str = "cpu", progress: bool = False) -> list[float]:
    """Train `vae` (diffusers AutoencoderKL) on random frames of `store` (data.ClipStore). Returns losses.
    Deterministic in `seed`, so every data-parallel process fits the same VAE."""
    from tqdm import tqdm

    from emo_stream.training.data import _to_tensor

    rng = np.random.default_rng([seed, 5])
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="fitting VAE", disable=not progress):
        imgs = []
        for _ in range(batch_size):
            clip = store.load(int(rng.integers(len(store))))
            imgs.append(clip.frames[int(rng.integers(len(clip.frames)))])
        x = _to_tensor(np.stack(imgs), size).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, x) + torch.nn.functional.l1_loss(rec, x) \
            + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    vae.eval().requires_grad_(False)
    log.info("VAE fitted in %d steps: loss %.4f -> %.4f", steps, np.mean(losses[:10]), np.mean(losses[-10:]))
    return losses
