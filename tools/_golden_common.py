"""What tools/golden_echomimic.py and tools/golden_hallo.py share (both run a reference checkout's own code in its
own venv to write a golden set). Imported by those scripts from their folder (tools/ is on sys.path when one
runs); no reference code here, and nothing from emo_stream (the reference venvs do not install it)."""

from __future__ import annotations

import types
from pathlib import Path


def git_commit(path: str, unknown: str = "unknown (no .git in the checkout)") -> str:
    """The checkout's commit (7 characters) from .git/HEAD, or `unknown` where it has no .git."""
    head = Path(path) / ".git" / "HEAD"
    if head.is_file():
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            f = Path(path) / ".git" / ref[5:]
            return f.read_text().strip()[:7] if f.is_file() else ref
        return ref[:7]
    return unknown


def randomize(module, gen) -> None:
    """Random weights everywhere (the references zero-initialise several layers, which would hide their paths):
    matrices ~ N(0, 1 / fan_in), norm weights 1 + 0.1 N, biases 0.1 N; buffers stay as built."""
    import torch
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


class ScaledLatents:
    """The VAE mean whose `* 0.18215` (the pipeline's scaling) gives the given reference latents exactly."""

    def __init__(self, latents):
        self.latents = latents

    def __mul__(self, factor):
        assert factor == 0.18215, factor
        return self.latents


class StandInVae:
    """What the reference pipelines ask of their VAE: encode(...).latent_dist.mean (scaled by 0.18215 in the
    pipeline: the given reference latents), decode(...).sample (zeros of the image size), dtype, device,
    config.block_out_channels (4 levels: vae_scale_factor 8)."""

    def __init__(self, ref_latents, hw: tuple[int, int]):
        import torch
        self.mean, self.hw = ScaledLatents(ref_latents), tuple(hw)
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.config = types.SimpleNamespace(block_out_channels=[1, 1, 1, 1])

    def encode(self, _pixels):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=self.mean))

    def decode(self, z):
        import torch
        return types.SimpleNamespace(sample=torch.zeros(z.shape[0], 3, *self.hw))


def save(folder: Path, name: str, tensors: dict, keep_int64: bool = False) -> None:
    """A safetensors file of float32 tensors (int64 ones kept as they are with keep_int64)."""
    import torch
    from safetensors.torch import save_file
    save_file({k: (v if keep_int64 and v.dtype == torch.int64 else v.detach().float()).contiguous()
               for k, v in tensors.items()}, str(folder / name))


def shapes(d: dict) -> dict:
    return {k: list(v.shape) for k, v in d.items()}
