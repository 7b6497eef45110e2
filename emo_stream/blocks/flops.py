"""FLOP counting shared by the families' counters (their flops.py; bench/flops.py runs them): the models are
built on the meta device without weights and counted with torch.utils.flop_counter, so nothing is computed.

Each family's `records(size)` returns records with: family, variant, mode, steps, guidance, segment_frames and,
per generated frame (TFLOP), `parts` (reference, motion, audio, condition, denoise, guidance, decode),
tflop_per_frame_per_step and tflop_per_frame_total (see bench/flops.py).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

AMORTISE_SECONDS = 60  # the reference is encoded once per avatar: shown per frame over a minute of video
FPS = 25
META = torch.device("meta")


def round4(v: float) -> float:
    """4 significant digits: sd15 figures read as 0.8074, the tiny preset's stay non-zero."""
    return float(f"{v:.4g}")


def tflop(fn: Callable[[], Any], by_module: bool = False) -> tuple[float, dict]:
    """(TFLOP counted while running fn, per-module counts if asked)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None if by_module else 1)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e12, (counter.get_flop_counts() if by_module else {})


def totals(per_step: float, parts: dict[str, float]) -> dict[str, Any]:
    """The per-frame fields every family's record shares, rounded."""
    return {"tflop_per_frame_per_step": round4(per_step), "tflop_per_frame_total": round4(sum(parts.values())),
            "parts": {k: round4(v) for k, v in parts.items()}}


def sd15_decoders() -> tuple[dict, dict]:
    """(AutoencoderKL kwargs, AutoencoderTiny kwargs) of SD1.5's VAE and TAESD (configs/models/sd15.yaml)."""
    from emo_stream.config_io import read_yaml
    from emo_stream.resources import resource_dir

    data = read_yaml(resource_dir("configs") / "models" / "sd15.yaml", "model config")
    return dict(data["vae"]), dict(data["taesd"])
