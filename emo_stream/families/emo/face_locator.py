"""Face locator: a light conv net that encodes the face-region mask into the latent space; its output is
added to the noisy latent (EMO section 3.2). The last conv starts at zero, so it is a no-op at step 0."""

from __future__ import annotations

import torch
from torch import nn

from emo_stream.families.emo.attention import zero_module


class FaceLocator(nn.Module):
    def __init__(self, channels: list[int], latent_channels: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1), nn.SiLU()]
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out = zero_module(nn.Conv2d(channels[-1], latent_channels, 3, padding=1))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (batch, 1, H, W) in {0, 1} at pixel resolution -> (batch, latent_channels, H / 8, W / 8)."""
        return self.out(self.net(mask.to(self.out.weight.dtype)))
