"""The video backbone: diffusers UNetMotionModel (SD1.5 2D weights + AnimateDiff temporal modules) with EMO's
conditioning installed through attention processors (see attention.py).

Temporal modules and motion frames: each temporal module (diffusers' AnimateDiffTransformer3D, class swapped in
place to MotionFramesTransformer: same parameters) puts the n motion frames' ReferenceNet features of its site
in front of the clip's frames, so the temporal attention (and its group norm) sees n + f frames, and drops the
motion frames from its output again.

Motion-frame pruning (exact): the motion frames' outputs are dropped, so only what the clip frames read from
them is needed: their tokens through the first temporal attention (they are keys/values of the second one).
With `options.prune_motion` on (default), the motion frames skip the second attention's queries, the
feed-forward and the output projection: about two thirds of their temporal cost.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from emo_stream.families.emo.attention import (AudioAttnProcessor, BackboneContext, ReferenceAttnProcessor,
                                         SpeedAttnProcessor)


def _attention_module(unet: nn.Module, processor_name: str):
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


@dataclass
class BackboneOptions:
    prune_motion: bool = True   # exact shortcuts (see attention.py and this module); False runs the plain
    uniform_speed: bool = True  # path, for tests and for counting what the shortcuts save (bench/flops.py)


def join_motion(motion: torch.Tensor, hidden: torch.Tensor, frames: int) -> torch.Tensor:
    """(b * frames, ...) hidden states -> (b * (n + frames), ...) with each sample's (b, n, ...) motion-frame
    features in front of its frames along the frame axis."""
    b = hidden.shape[0] // frames
    x = torch.cat([motion.to(hidden.dtype), hidden.reshape(b, frames, *hidden.shape[1:])], dim=1)
    return x.reshape(-1, *hidden.shape[1:])


def drop_motion(out: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """join_motion undone on a temporal module's output: (batch * (n + f), ...) -> (batch * f, ...)."""
    return out.reshape(batch, -1, *out.shape[1:])[:, n:].reshape(-1, *out.shape[1:])


class MotionFramesTransformer(AnimateDiffTransformer3D):
    """AnimateDiffTransformer3D (same parameters) at a backbone temporal site: puts the site's motion-frame
    features in front of the clip's frames along the frame axis and drops them from the output. With
    `prune_motion`, computes the clip frames' output only (same result, see the module doc).

    The backbone swaps the class of diffusers' modules in place and sets `emo_site`, `emo_context` and
    `emo_options` (plain attributes, so a deepcopy of the backbone stays wired to its own context).
    """

    emo_site: str = ""
    emo_context: BackboneContext | None = None
    emo_options: BackboneOptions | None = None

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None,
                num_frames: int = 1, cross_attention_kwargs=None):
        ctx = self.emo_context
        motion = ctx.motion.get(self.emo_site) if ctx is not None and ctx.motion else None
        if motion is None:
            return super().forward(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                                   cross_attention_kwargs)
        b, n = motion.shape[:2]
        x = join_motion(motion, hidden_states, num_frames)
        if self.emo_options.prune_motion and encoder_hidden_states is None and cross_attention_kwargs is None:
            return self._pruned(x, num_frames + n, n)
        out = super().forward(x, encoder_hidden_states, timestep, class_labels, num_frames + n, cross_attention_kwargs)
        return drop_motion(out, b, n)

    def _pruned(self, hidden_states: torch.Tensor, num_frames: int, motion: int) -> torch.Tensor:
        blocks = list(self.transformer_blocks)
        last = blocks[-1]
        bf, c, h, w = hidden_states.shape
        b = bf // num_frames
        f = num_frames - motion
        if last.norm_type != "layer_norm" or last.attn2 is None or last.only_cross_attention \
                or last._chunk_size is not None:  # not AnimateDiff's block: the plain path
            return drop_motion(super().forward(hidden_states, num_frames=num_frames), b, motion)
        residual = drop_motion(hidden_states, b, motion)
        x = hidden_states.reshape(b, num_frames, c, h, w).permute(0, 2, 1, 3, 4)
        x = self.norm(x)  # group norm over all frames, motion frames included, as in the plain path
        x = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, num_frames, c)
        x = self.proj_in(input=x)
        for block in blocks[:-1]:
            x = block(hidden_states=x)
        # last block: every frame through the first attention (the motion frames' results are keys and
        # values of the second); then only the clip frames' queries, feed-forward and output projection
        y = last.norm1(x)
        if last.pos_embed is not None:
            y = last.pos_embed(y)
        x = last.attn1(y) + x
        y = last.norm2(x)
        if last.pos_embed is not None:
            y = last.pos_embed(y)
        x = last.attn2(y[:, motion:], encoder_hidden_states=y) + x[:, motion:]
        x = last.ff(last.norm3(x)) + x
        x = self.proj_out(input=x)
        x = x.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, h, w)
        return x + residual


class Backbone(nn.Module):
    def __init__(self, unet: UNetMotionModel, audio_dim: int, speed_dim: int):
        super().__init__()
        self.unet = unet
        self.context = BackboneContext()
        self.options = BackboneOptions()
        procs: dict[str, object] = {}
        for name in unet.attn_processors:
            attn = _attention_module(unet, name)
            heads, dim = attn.heads, attn.to_q.out_features
            temporal = ".motion_modules." in name
            if name.endswith("attn1.processor"):
                procs[name] = attn.processor if temporal else ReferenceAttnProcessor(name, self.context)
            elif temporal:
                procs[name] = SpeedAttnProcessor(dim, speed_dim, heads, self.context, name=name)
            else:
                procs[name] = AudioAttnProcessor(dim, audio_dim, heads, self.context, name=name)
        unet.set_attn_processor(procs)
        # the temporal modules themselves: down/up_blocks.I.motion_modules.J and mid_block.motion_modules.J
        self.sites = [n for n, m in unet.named_modules()
                      if (n.count(".") == 3 and ".motion_modules." in n and not n.startswith("mid_block."))
                      or (n.startswith("mid_block.motion_modules.") and n.count(".") == 2)]
        for site in self.sites:
            module = unet.get_submodule(site)
            if type(module) is AnimateDiffTransformer3D:
                module.__class__ = MotionFramesTransformer  # same parameters, adds the motion frames
                module.emo_site, module.emo_context, module.emo_options = site, self.context, self.options
            else:  # another temporal module: concatenate / drop with hooks, no pruning
                module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True)
                module.register_forward_hook(self._post_hook(site))

    def reference_kv(self, tokens: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Reference tokens (layer -> (batch, tokens, C)) -> their key/value projections in each layer's
        reference-attention: constant per avatar, so inference computes them once (BackboneContext)."""
        out = {}
        for name, ref in tokens.items():
            attn = _attention_module(self.unet, name)
            out[name] = (attn.to_k(ref), attn.to_v(ref))
        return out

    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, adapter: MotionAdapter, audio_dim: int,
                    speed_dim: int, load_weights: bool = True) -> "Backbone":
        """Inflate a 2D UNet (keeps its weights) with the adapter's temporal modules, then add EMO's layers.

        load_weights=False builds the structure only (weights loaded afterwards from a checkpoint)."""
        # from_unet2d casts with .to(dtype), which makes diffusers 0.42 log a spurious fp32 warning
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            unet = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=load_weights)
        finally:
            quiet.setLevel(level)
        return cls(unet, audio_dim, speed_dim)

    # ---- motion frames along the frame axis ------------------------------------------------------
    def _pre_hook(self, site: str):
        def hook(module, args, kwargs):
            motion = self.context.motion.get(site) if self.context.motion else None
            if motion is None:
                return None
            # arguments by name, whichever way diffusers passes them (positional or keyword)
            call = signature.bind(*args, **kwargs)
            hidden = call.arguments["hidden_states"]
            frames = call.arguments.get("num_frames", signature.parameters["num_frames"].default)
            call.arguments["hidden_states"] = join_motion(motion, hidden, frames)
            call.arguments["num_frames"] = frames + motion.shape[1]
            return call.args, call.kwargs
        signature = inspect.signature(self.unet.get_submodule(site).forward)
        if not {"hidden_states", "num_frames"} <= set(signature.parameters):
            raise TypeError(f"temporal module {site}: forward() has no hidden_states/num_frames "
                            f"({signature}); this diffusers version is not supported")
        return hook

    def _post_hook(self, site: str):
        def hook(module, args, output):
            motion = self.context.motion.get(site) if self.context.motion else None
            if motion is None:
                return None
            return drop_motion(output, *motion.shape[:2])
        return hook

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, audio_tokens: torch.Tensor,
                context: BackboneContext) -> torch.Tensor:
        """sample (batch, 4, frames, h, w); audio_tokens (batch * frames, tokens, dim) -> noise prediction.

        `context` (reference tokens, motion features, speed tokens) is installed for this call; the attention
        processors and motion-frame hooks read it. With autograd on it stays installed until the next call
        replaces it: gradient checkpointing re-runs those processors and hooks during backward, after this
        call returned (so with checkpointing, run backward before the next training forward). Without
        autograd (inference) it is cleared on return so no features outlive the call; the engine's other
        threads (audio encoding, VAE decoding) never touch the backbone.
        """
        self.context.__dict__.update(context.__dict__)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=audio_tokens, return_dict=False)[0]
        finally:
            if not torch.is_grad_enabled():
                self.context.__dict__.update(BackboneContext().__dict__)
