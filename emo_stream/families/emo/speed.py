"""Speed layers: head-rotation speed -> tokens the temporal modules cross-attend to (EMO section 3.2).

Speed w (degrees per frame) is mapped on d buckets, s_d = tanh((w - c_d) / r_d * 3), each frame sees the
buckets of frames [k - m, k + m] (edge-padded), and an MLP turns that window into one token per frame.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from emo_stream.face import head_speed


def speed_buckets(speed: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(..., frames) speeds -> (..., frames, d) soft bucket codes in [-1, 1]."""
    return torch.tanh((speed[..., None] - centers) / radii * 3)


class SpeedEncoder(nn.Module):
    def __init__(self, centers: list[float], radii: list[float], hidden_dim: int, token_dim: int, window: int = 2):
        super().__init__()
        self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32), persistent=False)
        self.register_buffer("radii", torch.tensor(radii, dtype=torch.float32), persistent=False)
        self.window = window
        d = len(centers) * (2 * window + 1)
        self.mlp = nn.Sequential(nn.Linear(d, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, token_dim))

    def forward(self, speed: torch.Tensor) -> torch.Tensor:
        """speed (batch, frames) -> tokens (batch, frames, token_dim)."""
        s = speed_buckets(speed.float(), self.centers, self.radii)          # (b, f, d)
        m = self.window
        if m:
            s = torch.cat([s[:, :1].expand(-1, m, -1), s, s[:, -1:].expand(-1, m, -1)], dim=1)
        win = s.unfold(1, 2 * m + 1, 1)                                      # (b, f, d, 2m + 1)
        return self.mlp(win.flatten(2).to(self.mlp[0].weight.dtype))


def rotation_speed(poses: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Head poses (frames, 3) yaw/pitch/roll in radians (emo_stream.face.FaceInfo.head_pose) -> speed per frame
    in degrees per frame, the unit of the speed buckets (emo_stream.face.head_speed, unsmoothed)."""
    p = np.asarray(poses.detach().cpu() if isinstance(poses, torch.Tensor) else poses, np.float32)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"poses must be (frames, 3), got {tuple(p.shape)}")
    return torch.from_numpy(head_speed(p, smooth=1))
