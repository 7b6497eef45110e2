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

Constant work is done once (each shortcut is exact: tests compare it with the plain path to 1e-5):
- reference K/V: the reference tokens' key/value projections depend only on the avatar, so inference
  precomputes them once per avatar (`BackboneContext.reference_kv`) instead of per step and frame.
- audio / speed K/V: the audio and speed tokens are constant for a segment; with `kv_cache` set (inference)
  their projections are computed at the first denoising step and reused by the others.
- uniform speed: when every speed token of a sample is the same (a constant head speed, the live case),
  attention to them returns that token's value whatever the query: the cross-attention is one vector per
  sample, no per-pixel query projection.
- single-token cross-attention (the ReferenceNet's null text token): the output is to_out(to_v(token)).
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
    # inference shortcuts (see the module docstring); None / False: compute everything per call
    reference_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (k, v), (batch, tokens, C)
    kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None      # per segment: audio/speed K/V
    speed_uniform: bool = False   # every sample's speed tokens are all equal

    @property
    def motion_frames(self) -> int:
        if not self.motion:
            return 0
        return next(iter(self.motion.values())).shape[1]


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

    def kv(self, context: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        context = context.to(dtype)
        return self.to_k(context), self.to_v(context)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`kv`: precomputed self.kv(context) (a segment's cache); `context` is then not read."""
        q = self.to_q(hidden_states)
        k, v = kv if kv is not None else self.kv(context, q.dtype)
        o = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.to_out[0](_merge(o))


def cat_kv(items: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (k, v) dicts concatenated along the batch (reference K/V of several samples)."""
    return {k: (torch.cat([i[k][0] for i in items]), torch.cat([i[k][1] for i in items])) for k in items[0]}


def _cached_kv(cache: dict | None, key: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


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


class SingleTokenCrossAttnProcessor:
    """ReferenceNet attn2 (SD's text cross-attention; the ReferenceNet sees one null token): softmax over a
    single key is 1, so the output is to_out(to_v(token)) for every query. Exact; skips the per-pixel
    query projection and attention. Anything else goes through the standard processor."""

    enabled = True

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        plain = (not self.enabled or encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1 or attention_mask is not None
                 or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross
                 or attn.residual_connection or hidden_states.ndim != 3)
        if plain:
            return _DEFAULT(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        v = attn.to_v(encoder_hidden_states.to(hidden_states.dtype))          # (batch, 1, inner)
        out = attn.to_out[1](attn.to_out[0](v)) / attn.rescale_output_factor  # (batch, 1, dim)
        return out.expand(-1, hidden_states.shape[1], -1)


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
        # the reference's projections: precomputed once per avatar when given, else once per sample here;
        # either way shared across the sample's frames
        cached = self.context.reference_kv.get(self.name) if self.context.reference_kv else None
        rk, rv = cached if cached is not None else (attn.to_k(ref), attn.to_v(ref))
        k = torch.cat([attn.to_k(hidden_states), rk.to(q.dtype).repeat_interleave(frames, 0)], dim=1)
        v = torch.cat([attn.to_v(hidden_states), rv.to(q.dtype).repeat_interleave(frames, 0)], dim=1)
        out = F.scaled_dot_product_attention(_heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads))
        out = attn.to_out[1](attn.to_out[0](_merge(out).to(q.dtype)))
        return out / attn.rescale_output_factor


class AudioAttnProcessor(nn.Module):
    """Backbone attn2 -> audio-attention: a new cross-attention from the frame's tokens to its audio tokens.

    The audio tokens arrive as the UNet's `encoder_hidden_states`, (batch * frames, tokens, dim).
    """

    def __init__(self, query_dim: int, audio_dim: int, heads: int, context: BackboneContext | None = None,
                 name: str = "audio"):
        super().__init__()
        self.attn = new_cross_attention(query_dim, audio_dim, heads)
        self.context = context  # a plain object: not a submodule, not in the state dict
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            return torch.zeros_like(hidden_states)
        cache = self.context.kv_cache if self.context is not None else None
        kv = _cached_kv(cache, self.name, lambda: self.attn.kv(encoder_hidden_states, hidden_states.dtype))
        return self.attn(hidden_states, encoder_hidden_states, kv=kv)


class SpeedAttnProcessor(nn.Module):
    """Temporal attn2: the pretrained temporal self-attention plus a new cross-attention to speed tokens.

    Temporal attention rows are (batch * h * w, frames, channels); every row of a sample attends to the
    same speed tokens, so the queries are regrouped per sample instead of copying keys per pixel.
    """

    def __init__(self, query_dim: int, speed_dim: int, heads: int, context: BackboneContext, name: str = "speed"):
        super().__init__()
        self.attn = new_cross_attention(query_dim, speed_dim, heads)
        self.context = context
        self.name = name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        out = _DEFAULT(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        speed = self.context.speed
        if speed is None:
            return out
        rows, frames, channels = hidden_states.shape
        batch = speed.shape[0]
        # every query attends to all the sample's speed tokens; with the motion frames pruned
        # (backbone.MotionFramesTransformer) only the clip frames ask, the keys stay n + f
        pruned = encoder_hidden_states is not None and speed.shape[1] == frames + self.context.motion_frames
        if not (speed.shape[1] == frames or pruned) or rows % batch:
            raise ValueError(f"speed tokens {tuple(speed.shape)} do not match temporal attention input "
                             f"{tuple(hidden_states.shape)}")
        a = self.attn
        if self.context.speed_uniform:
            # all keys equal: the softmax weights are uniform over equal values -> the value itself
            o = a.to_out[0](a.to_v(speed[:, :1].to(hidden_states.dtype)))          # (batch, 1, C)
            return out + o.repeat_interleave(rows // batch, 0)
        q = a.to_q(hidden_states).reshape(batch, (rows // batch) * frames, -1)
        k, v = _cached_kv(self.context.kv_cache, self.name, lambda: a.kv(speed, q.dtype))
        o = F.scaled_dot_product_attention(_heads(q, a.heads), _heads(k, a.heads), _heads(v, a.heads))
        o = a.to_out[0](_merge(o)).reshape(rows, frames, -1)
        return out + o
