"""The pieces that make diffusers' UNets compute exactly what EchoMimic v1's code computes.

diffusers lets a model swap how each attention layer computes (`set_attn_processor`); EchoMimic's
differences from a stock SD1.5/AnimateDiff UNet are expressed that way, plus one norm subclass and one hook:

- BankWriteProcessor      ReferenceNet attn1: remembers its (normalised) input tokens, attends as usual.
- BankReadProcessor       denoiser spatial attn1: keys/values = [own tokens ++ reference tokens of the same
                          block]; rows whose `with_reference` is False (guidance's unconditional half) attend
                          to their own tokens only. The bank is stored in `bank_dtype` (EchoMimic casts it to
                          float16 even in fp32 runs) and promoted back when concatenated.
- ScaledCrossAttnProcessor  denoiser spatial attn2: plain cross-attention to the frame's audio tokens (passed
                          as the UNet's encoder_hidden_states, one row per frame), output times 3.0.
- PerFrameGroupNorm       the temporal modules' GroupNorm, applied per frame (AnimateDiff's original code;
                          diffusers' AnimateDiffTransformer3D normalises over all frames together).
The face-locator feature is added after conv_in by a forward hook (EchoMimicModel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

_SDPA = AttnProcessor2_0()


@dataclass
class DenoiserContext:
    """Per-call inputs the denoiser's processors and hooks read (set by EchoMimicModel.denoise)."""

    frames: int = 1
    bank: dict[str, torch.Tensor] | None = None    # block name -> (B, tokens, C) reference tokens
    with_reference: tuple[bool, ...] | None = None  # per sample (R,), None = all rows; row r uses bank row r % B
    face: torch.Tensor | None = None               # (R, C0, h, w) added after conv_in (per frame)


@dataclass
class BankStore:
    capture: bool = False
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)


def block_name(processor_name: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor' -> '...transformer_blocks.0'.

    EchoMimic pairs ReferenceNet and denoiser blocks by position in a channel-sorted DFS list; the two UNets
    have the same layout, so that is the block of the same name."""
    return processor_name.rsplit(".attn", 1)[0]


class BankWriteProcessor:
    def __init__(self, name: str, store: BankStore):
        self.name = block_name(name)
        self.store = store

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if self.store.capture:
            self.store.tokens[self.name] = hidden_states
        return _SDPA(attn, hidden_states, None, attention_mask, temb)


class BankReadProcessor:
    def __init__(self, name: str, context: DenoiserContext):
        self.name = block_name(name)
        self.context = context

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        ctx = self.context
        bank = ctx.bank.get(self.name) if ctx.bank else None
        if bank is None:
            return _SDPA(attn, hidden_states, None, attention_mask, temb)
        rows, f = hidden_states.shape[0], ctx.frames
        samples = rows // f
        session = torch.arange(samples, device=bank.device) % bank.shape[0]
        # the bank row of every frame row, promoted to the activations' dtype (the fp16 rounding stays)
        ref = bank[session.repeat_interleave(f)].to(hidden_states.dtype)
        use = ctx.with_reference
        if use is None:                      # every row attends to the reference (no host sync; works on meta)
            return _SDPA(attn, hidden_states, torch.cat([hidden_states, ref], dim=1), attention_mask, temb)
        # a host-side tuple, one bool per sample (rows are sample-major): runs of equal values become row
        # slices, so splitting the batch needs no nonzero() / read-back of a device mask
        parts, start = [], 0
        for end in range(1, len(use) + 1):
            if end == len(use) or use[end] != use[start]:
                h = hidden_states[start * f:end * f]
                kv = torch.cat([h, ref[start * f:end * f]], dim=1) if use[start] else h
                parts.append(_SDPA(attn, h, kv, attention_mask, temb))
                start = end
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class ScaledCrossAttnProcessor:
    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("EchoMimic's audio cross-attention needs audio tokens")
        return _SDPA(attn, hidden_states, encoder_hidden_states.to(hidden_states.dtype), attention_mask, temb) \
            * self.scale


class PerFrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (channels/groups, h, w) of each frame of a (batch, channels, frames, h, w) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b, c, f, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).transpose(1, 2)

    @classmethod
    def replacing(cls, norm: nn.GroupNorm, num_groups: int | None = None) -> "PerFrameGroupNorm":
        new = cls(num_groups or norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                  device=norm.weight.device if norm.affine else None,
                  dtype=norm.weight.dtype if norm.affine else None)
        if norm.affine:
            new.weight, new.bias = norm.weight, norm.bias
        return new


class FaceLocator(ControlNetConditioningEmbedding):
    """EchoMimic's face locator is diffusers' ControlNet conditioning embedding (same layers and key names:
    conv_in + SiLU, per stage [conv + SiLU, stride-2 conv + SiLU], zero-initialised conv_out). Its
    (B, C0, H/8, W/8) output is added to the denoiser's conv_in output, the same on every frame."""

    def __init__(self, out_channels: int, conditioning_channels: int = 1,
                 channels: tuple[int, ...] | list[int] = (16, 32, 96, 256)):
        super().__init__(out_channels, conditioning_channels, tuple(channels))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, 1, H, W) or (B, 1, 1, H, W) in [0, 1] -> (B, C0, 1, H/8, W/8)."""
        if mask.ndim == 5:
            if mask.shape[2] != 1:
                raise ValueError(f"face mask must have one frame, got {tuple(mask.shape)}")
            mask = mask[:, :, 0]
        return super().forward(mask.to(self.conv_in.weight.dtype))[:, :, None]


def face_mask(box_xyxy, height: int, width: int, clamp: bool = True) -> torch.Tensor:
    """EchoMimic's face mask (infer_audio2vid*.py): the box (x0, y0, x1, y1) in pixels grown by 10 % of its
    height (rows) and width (columns) on each side -> (1, 1, 1, H, W) float32 in {0, 1}.

    clamp=False keeps the original's numpy slicing exactly (a grown box starting above/left of the image gives
    a negative start, which numpy counts from the far edge); clamp=True cuts the box at the image's top/left
    edges instead (a box entirely above/left of the image gives an empty mask)."""
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    r_pad, c_pad = int((y1 - y0) * 0.1), int((x1 - x0) * 0.1)
    top, left, bottom, right = y0 - r_pad, x0 - c_pad, y1 + r_pad, x1 + c_pad
    if clamp:
        top, left, bottom, right = max(top, 0), max(left, 0), max(bottom, 0), max(right, 0)
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1.0
    return mask[None, None, None]
