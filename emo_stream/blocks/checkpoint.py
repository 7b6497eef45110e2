"""Our checkpoint folder, shared by every model family: config.yaml (the family's settings, its
`architecture` key included) + model.safetensors (every part), loaded without random init."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import yaml
from torch import nn

from emo_stream.errors import WeightsError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"

M = TypeVar("M", bound=nn.Module)


def save_checkpoint(model: nn.Module, config: dict[str, Any], directory: str | Path, **metadata: str) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "emo_stream": "1", **metadata})
    return directory


def load_checkpoint(directory: str | Path, parse_config: Callable[[Any, str], Any], build: Callable[[Any], M],
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> M:
    """parse_config(yaml data, source) -> config; build(config) -> the model with empty weights.
    Raises WeightsError naming the file, key and shape."""
    from emo_stream.blocks.weights import load_checked, read_state_dict

    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"model folder not found: {directory}")
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise WeightsError(f"{cfg_path} is missing: not an emo-stream checkpoint folder "
                           f"(expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as exc:
        raise WeightsError(f"{cfg_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    config = parse_config(data, str(cfg_path))
    state = read_state_dict(directory / WEIGHTS_FILE)
    model = build(config)   # empty: no random init of ~2B parameters just to overwrite them
    load_checked(model, state, directory / WEIGHTS_FILE, assign=True)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
