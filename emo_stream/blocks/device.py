"""--device and --dtype as the model backends' factories take them: one ConfigError line for bad values."""

from __future__ import annotations

from typing import Any

import torch

from emo_stream.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_device(device: str | None) -> torch.device:
    """--device -> torch.device (default cuda when available, else cpu); bad or unavailable ones are one
    ConfigError line."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here (use --device cpu)")
    return dev


def parse_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """--dtype (a name like fp16, a torch.dtype, or None: fp16 on CUDA, fp32 elsewhere) -> torch.dtype."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[str(dtype).lower()]
