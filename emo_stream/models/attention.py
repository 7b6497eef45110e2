"""Attention processors that turn diffusers' UNets into EMO without forking them.

diffusers lets a model swap how each attention layer computes (`set_attn_processor`); EMO's extra
conditioning is expressed that way:

- ReferenceWriteProcessor   ReferenceNet spatial self-attention (attn1): stores the normalised hidden
                            states it sees, then attends as usual.
- ReferenceAttnProcessor    backbone spatial self-attention (attn1): keys/values are the frame's own tokens
                            concatenated with the cached ReferenceNet tokens of the same layer.
- AudioAttnProcessor        backbone spatial attn2 (SD's text cross-attention; EMO has no text): replaced by
                            a NEW cross-attention from the block's hidden states to the frame's audio tokens,
                            output zero-initialised. The SD text weights of attn2 stay loaded but unused.
- SpeedAttnProcessor        temporal modules' second attention: its pretrained temporal self-attention plus
                            a NEW cross-attention to the clip's head-speed tokens, output zero-initialised.

Processors read per-call conditioning from a shared `BackboneContext` that the backbone fills before each
forward (diffusers does not pass extra inputs to the temporal modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

_DEFAULT = AttnProcessor2_0()


@dataclass
class ReferenceStore:
    """Where the ReferenceNet's write processors and site hooks put what they see during one pass."""

    capture_tokens: bool = False
    capture_sites: bool = False
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    sites: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BackboneContext:
    """Conditioning for one backbone forward. `batch` counts samples (guidance halves included).

    reference: layer name -> (batch, tokens, channels) ReferenceNet tokens
    motion:    temporal site -> (batch, n, channels, h, w) motion-frame features
    speed:     (batch, n + frames or frames, dim) speed tokens for every frame the temporal modules see
    """

    batch: int = 1
    reference: dict[str, torch.Tensor] | None = None
    motion: dict[str, torch.Tensor] | None = None
    speed: torch.Tensor | None = None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class CrossAttention(nn.Module):
    """A plain multi-head cross-attention for EMO's new layers.

    Deliberately not a diffusers `Attention`: diffusers walks every `Attention` inside a UNet when it sets
    or lists processors, and these layers live inside processors.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = max(1, heads)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(hidden_states)
        context = context.to(q.dtype)
        o = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(self.to_k(context), self.heads),
                                           _heads(self.to_v(context), self.heads))
        return self.to_out[0](_merge(o))


def new_cross_attention(query_dim: int, context_dim: int, heads: int) -> CrossAttention:
    """A fresh cross-attention whose output projection is zero: adding it changes nothing at step 0."""
    attn = CrossAttention(query_dim, context_dim, heads)
    zero_module(attn.to_out[0])
    return attn


class ReferenceWriteProcessor:
    """ReferenceNet attn1: remember the (already normalised) input tokens of this layer, attend normally."""

    def __init__(self, name: str, store: ReferenceStore):
        self.name = name
        self.store = store

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if self.store.capture_tokens:
            self.store.tokens[self.name] = hidden_states
        return _DEFAULT(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceAttnProcessor:
    """Backbone attn1: self-attention whose keys/values also include the ReferenceNet tokens of this layer
    (the pretrained attn1 weights are reused, as in AnimateAnyone/EMO)."""

    def __init__(self, name: str, context: BackboneContext):
        self.name = name
        self.context = context

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        ref = self.context.reference.get(self.name) if self.context.reference else None
        if ref is None:
            return _DEFAULT(attn, hidden_states, None, attention_mask, temb)
        rows = hidden_states.shape[0]
        if rows % ref.shape[0]:
            raise ValueError(f"{self.name}: {rows} frames for {ref.shape[0]} reference rows (batch mismatch)")
        frames = rows // ref.shape[0]
        q = attn.to_q(hidden_states)
        # project the reference once per sample, then share it across that sample's frames
        k = torch.cat([attn.to_k(hidden_states), attn.to_k(ref).repeat_interleave(frames, 0)], dim=1)
        v = torch.cat([attn.to_v(hidden_states), attn.to_v(ref).repeat_interleave(frames, 0)], dim=1)
        out = F.scaled_dot_product_attention(_heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads))
        out = attn.to_out[1](attn.to_out[0](_merge(out).to(q.dtype)))
        return out / attn.rescale_output_factor


class AudioAttnProcessor(nn.Module):
    """Backbone attn2 -> audio-attention: a new cross-attention from the frame's tokens to its audio tokens.

    The audio tokens arrive as the UNet's `encoder_hidden_states`, (batch * frames, tokens, dim).
    """

    def __init__(self, query_dim: int, audio_dim: int, heads: int):
        super().__init__()
        self.attn = new_cross_attention(query_dim, audio_dim, heads)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            return torch.zeros_like(hidden_states)
        return self.attn(hidden_states, encoder_hidden_states)


class SpeedAttnProcessor(nn.Module):
    """Temporal attn2: the pretrained temporal self-attention plus a new cross-attention to speed tokens.

    Temporal attention rows are (batch * h * w, frames, channels); every row of a sample attends to the
    same speed tokens, so the queries are regrouped per sample instead of copying keys per pixel.
    """

    def __init__(self, query_dim: int, speed_dim: int, heads: int, context: BackboneContext):
        super().__init__()
        self.attn = new_cross_attention(query_dim, speed_dim, heads)
        self.context = context

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        out = _DEFAULT(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        speed = self.context.speed
        if speed is None:
            return out
        rows, frames, channels = hidden_states.shape
        batch = speed.shape[0]
        if speed.shape[1] != frames or rows % batch:
            raise ValueError(f"speed tokens {tuple(speed.shape)} do not match temporal attention input "
                             f"{tuple(hidden_states.shape)}")
        a = self.attn
        q = a.to_q(hidden_states).reshape(batch, (rows // batch) * frames, -1)
        k, v = a.to_k(speed.to(q.dtype)), a.to_v(speed.to(q.dtype))
        o = F.scaled_dot_product_attention(_heads(q, a.heads), _heads(k, a.heads), _heads(v, a.heads))
        o = a.to_out[0](_merge(o)).reshape(rows, frames, -1)
        return out + o
