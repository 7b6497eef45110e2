"""Hallo's own small modules, named as in its `net.pth` so the file loads with a strict state dict.

- FaceLocator        conv net: face-region mask (3 channels, pixels) -> feature added after `conv_in`
- ImageProj          512-d face embedding -> 4 face tokens (the backbone's cross-attention keys)
- AudioProj          wav2vec2 window (5 frames x layers x dim) -> 32 audio tokens per video frame
- AudioModule        Hallo's audio block after each spatial transformer: self-attention, then three
                     cross-attentions to the audio tokens masked by full / face / lip regions, each through
                     a zero-initialised 1x1 conv, then feed-forward (norm / proj_in / block / proj_out)
- MotionModule       AnimateDiff's original temporal transformer (GroupNorm per frame, sinusoidal PE)

The UNets themselves are diffusers' UNet2DConditionModel (see unet.py); these modules are attached to its
blocks and run from hooks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


def attend(attn: Attention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers Attention's math (q from x, k/v from context or x, softmax(qk/sqrt(d))v, out proj)."""
    context = x if context is None else context
    b = x.shape[0]
    heads = attn.heads
    q = attn.to_q(x).view(b, -1, heads, attn.inner_dim // heads).transpose(1, 2)
    k = attn.to_k(context).view(b, -1, heads, attn.inner_dim // heads).transpose(1, 2)
    v = attn.to_v(context).view(b, -1, heads, attn.inner_dim // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, -1, attn.inner_dim).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))


# ---- conditioning encoders ---------------------------------------------------------------------------
class FaceLocator(nn.Module):
    """Per-frame convs (3x3, SiLU; every second conv strides 2) ending in a zero-initialised conv."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: list[int] | tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(chans[:-1], chans[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(chans[-1], conditioning_embedding_channels, 3, padding=1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """(b, 3, f, H, W) or (n, 3, H, W) -> the same layout at H/8 x W/8 with the embedding channels."""
        video = cond.dim() == 5
        if video:
            b, c, f, h, w = cond.shape
            cond = cond.transpose(1, 2).reshape(b * f, c, h, w)
        x = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            x = F.silu(conv(x))
        x = self.conv_out(x)
        if video:
            x = x.reshape(b, f, *x.shape[1:]).transpose(1, 2)
        return x


class ImageProj(nn.Module):
    """Face embedding (n, 512) -> (n, tokens, cross_attention_dim): Linear, reshape, LayerNorm."""

    def __init__(self, cross_attention_dim: int = 768, clip_embeddings_dim: int = 512,
                 clip_extra_context_tokens: int = 4):
        super().__init__()
        self.tokens = clip_extra_context_tokens
        self.dim = cross_attention_dim
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(emb).reshape(-1, self.tokens, self.dim))


class AudioProj(nn.Module):
    """Audio windows (b, f, window, layers, dim) -> tokens (b, f, context_tokens, output_dim)."""

    def __init__(self, seq_len: int = 5, blocks: int = 12, channels: int = 768, intermediate_dim: int = 512,
                 output_dim: int = 768, context_tokens: int = 32):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.proj1 = nn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b, f = windows.shape[:2]
        x = windows.reshape(b * f, -1)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        x = self.norm(self.proj3(x).reshape(b * f, self.context_tokens, self.output_dim))
        return x.reshape(b, f, self.context_tokens, self.output_dim)


# ---- audio block ------------------------------------------------------------------------------------
class AudioBlock(nn.Module):
    """One audio transformer block (Hallo's AudioTemporalBasicTransformerBlock, all masks enabled)."""

    def __init__(self, dim: int, heads: int, head_dim: int, audio_dim: int):
        super().__init__()
        self.zero_conv_full = nn.Conv2d(dim, dim, 1)
        self.zero_conv_face = nn.Conv2d(dim, dim, 1)
        self.zero_conv_lip = nn.Conv2d(dim, dim, 1)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2_0 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=head_dim)
        self.attn2_1 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=head_dim)
        self.attn2_2 = Attention(query_dim=dim, cross_attention_dim=audio_dim, heads=heads, dim_head=head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, masks: tuple[torch.Tensor, ...],
                scales: tuple[float, float, float], hw: tuple[int, int]) -> torch.Tensor:
        """x (n, h*w, dim); audio (n, tokens, audio_dim); masks full/face/lip each (n, h*w)."""
        x = attend(self.attn1, self.norm1(x)) + x
        normed = self.norm2(x)
        n, length, c = x.shape
        h, w = hw
        parts = []
        for attn, conv, mask, scale in zip((self.attn2_0, self.attn2_1, self.attn2_2),
                                           (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip),
                                           masks, scales):
            y = attend(attn, normed, audio) * mask[:, :, None]
            y = conv(y.reshape(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, length, c)
            parts.append(scale * y)
        # Hallo's order, ((full + face) + lip) + residual: float sums round by order, and a 1x1 level's
        # single-value group norms turn a last-bit difference into 1e-3 at the output
        out = parts[0] + parts[1] + parts[2] + x
        return self.ff(self.norm3(out)) + out


class AudioModule(nn.Module):
    """GroupNorm -> 1x1 proj_in -> AudioBlock -> 1x1 proj_out, residual (Hallo's Transformer3DModel)."""

    def __init__(self, channels: int, inner_dim: int, heads: int, audio_dim: int, norm_groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList([AudioBlock(inner_dim, heads, inner_dim // heads, audio_dim)])
        self.proj_out = nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, masks: tuple[torch.Tensor, ...],
                scales: tuple[float, float, float]) -> torch.Tensor:
        """x (n, c, h, w) frames; audio (n, tokens, dim); masks (n, h*w) each."""
        n, _, h, w = x.shape
        y = self.proj_in(self.norm(x))
        inner = y.shape[1]
        y = y.permute(0, 2, 3, 1).reshape(n, h * w, inner)
        for block in self.transformer_blocks:
            y = block(y, audio, masks, scales, (h, w))
        y = self.proj_out(y.reshape(n, h, w, inner).permute(0, 3, 1, 2).contiguous())
        return y + x


# ---- motion module (AnimateDiff v2 "Vanilla") -------------------------------------------------------
class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int = 32):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div)
        pe[0, :, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)   # saved in net.pth, loaded from it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.size(1)]


class TemporalAttention(Attention):
    """Self-attention along frames with a sinusoidal position encoding added to its input."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def temporal(self, x: torch.Tensor) -> torch.Tensor:
        """x ((b*h*w), frames, dim)."""
        return attend(self, self.pos_encoder(x))


class TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, n_attn: int, max_len: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, max_len) for _ in range(n_attn))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_attn))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn.temporal(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, layers: int, n_attn: int, max_len: int, norm_groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(TemporalBlock(channels, heads, n_attn, max_len)
                                                for _ in range(layers))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, c, f, h, w) -> same. GroupNorm runs per frame (AnimateDiff's original, not diffusers')."""
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)
        y = self.norm(frames).permute(0, 2, 3, 1).reshape(b, f, h * w, c)
        y = self.proj_in(y.transpose(1, 2).reshape(b * h * w, f, c))
        for block in self.transformer_blocks:
            y = block(y)
        # proj_out and the residual sum in AnimateDiff's own layout ((b f), h*w, c -> permuted, .contiguous()):
        # the sum takes its memory layout from its operands, and at a 1x1 level that layout reads as
        # channels-last, which sends the next group norm and conv down other kernels (other rounding)
        y = y.reshape(b, h * w, f, c).transpose(1, 2).reshape(b * f, h * w, c)
        y = self.proj_out(y).reshape(b * f, h, w, c).permute(0, 3, 1, 2).contiguous()
        return (y + frames).reshape(b, f, c, h, w).transpose(1, 2)


class MotionModule(nn.Module):
    # defaults: AnimateDiff's VanillaTemporalModule (used where a config leaves a key out)
    def __init__(self, channels: int, num_attention_heads: int = 8, num_transformer_block: int = 2,
                 attention_block_types: list[str] | tuple[str, ...] = ("Temporal_Self", "Temporal_Self"),
                 temporal_position_encoding_max_len: int = 24, norm_groups: int = 32,
                 temporal_position_encoding: bool = True, temporal_attention_dim_div: int = 1, **_: object):
        super().__init__()
        if any(t != "Temporal_Self" for t in attention_block_types):
            raise ValueError(f"only Temporal_Self motion attention is supported, got {list(attention_block_types)}")
        if not temporal_position_encoding or temporal_attention_dim_div != 1:
            raise ValueError("only motion modules with temporal_position_encoding and temporal_attention_dim_div 1 "
                             "are supported (Hallo's configuration)")
        self.temporal_transformer = TemporalTransformer(channels, num_attention_heads, num_transformer_block,
                                                        len(attention_block_types),
                                                        temporal_position_encoding_max_len, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(x)
