"""Helpers for tests and debugging of the model's conditioning paths.

EMO's new layers start with zero outputs, so an untrained model ignores audio, speed, the face mask and
(with a fresh motion adapter) the motion frames. `liven_new_layers` gives those outputs small random
values so a test can prove each path is connected.
"""

from __future__ import annotations

import torch

from emo_stream.families.emo.model import EmoModel


def zero_initialised_outputs(model: EmoModel) -> list[torch.nn.Parameter]:
    """The parameters EMO zero-initialises: new attention outputs, face locator output, temporal proj_out."""
    params = []
    for name, p in model.named_parameters():
        if (".processor.attn.to_out." in name or name.startswith("face_locator.out.")
                or (".motion_modules." in name and ".proj_out." in name)):
            params.append(p)
    return params


@torch.no_grad()
def liven_new_layers(model: EmoModel, std: float = 0.05, seed: int = 0) -> EmoModel:
    gen = torch.Generator().manual_seed(seed)
    for p in zero_initialised_outputs(model):
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
