"""The video backbone: diffusers UNetMotionModel (SD1.5 2D weights + AnimateDiff temporal modules) with EMO's
conditioning installed through attention processors and forward hooks (see attention.py).

Temporal modules and motion frames: before each temporal module (AnimateDiffTransformer3D) a pre-hook
concatenates the n motion frames' ReferenceNet features of that site in front of the clip's frames, so the
temporal attention (and its group norm) sees n + f frames; a post-hook drops the motion frames again.
"""

from __future__ import annotations

import inspect

import logging

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn

from emo_stream.models.attention import (AudioAttnProcessor, BackboneContext, ReferenceAttnProcessor,
                                         SpeedAttnProcessor)


def _attention_module(unet: nn.Module, processor_name: str):
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


class Backbone(nn.Module):
    def __init__(self, unet: UNetMotionModel, audio_dim: int, speed_dim: int):
        super().__init__()
        self.unet = unet
        self.context = BackboneContext()
        procs: dict[str, object] = {}
        for name in unet.attn_processors:
            attn = _attention_module(unet, name)
            heads, dim = attn.heads, attn.to_q.out_features
            temporal = ".motion_modules." in name
            if name.endswith("attn1.processor"):
                procs[name] = attn.processor if temporal else ReferenceAttnProcessor(name, self.context)
            elif temporal:
                procs[name] = SpeedAttnProcessor(dim, speed_dim, heads, self.context)
            else:
                procs[name] = AudioAttnProcessor(dim, audio_dim, heads)
        unet.set_attn_processor(procs)
        # the temporal modules themselves: down/up_blocks.I.motion_modules.J and mid_block.motion_modules.J
        self.sites = [n for n, m in unet.named_modules()
                      if (n.count(".") == 3 and ".motion_modules." in n and not n.startswith("mid_block."))
                      or (n.startswith("mid_block.motion_modules.") and n.count(".") == 2)]
        for site in self.sites:
            module = unet.get_submodule(site)
            module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True)
            module.register_forward_hook(self._post_hook(site))

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
            b = hidden.shape[0] // frames
            x = torch.cat([motion.to(hidden.dtype), hidden.reshape(b, frames, *hidden.shape[1:])], dim=1)
            call.arguments["hidden_states"] = x.reshape(-1, *hidden.shape[1:])
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
            b, n = motion.shape[:2]
            out = output.reshape(b, -1, *output.shape[1:])[:, n:]
            return out.reshape(-1, *output.shape[1:])
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
