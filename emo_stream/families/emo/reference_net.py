"""ReferenceNet: an SD1.5-shaped 2D UNet run at t=0 on a clean latent, whose inner features condition the
backbone.

It exposes two kinds of features (both from one pass):
- tokens: the normalised hidden states entering each spatial self-attention (attn1), read by the
  backbone's reference-attention. Computed ONCE per avatar (the reference image).
- sites:  the feature maps at each place where the backbone has a temporal module (after the spatial
  transformer, or after the resnet in blocks without attention). For motion frames these are what the
  temporal modules concatenate along the frame axis (EMO section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from emo_stream.families.emo.attention import (ReferenceStore, ReferenceWriteProcessor, SingleTokenCrossAttnProcessor,
                                         cat_kv)


@dataclass
class ReferenceFeatures:
    """What one ReferenceNet pass produced for a batch of latents (batch first everywhere)."""

    tokens: dict[str, torch.Tensor]   # attn1 processor name -> (batch, h*w, channels)
    sites: dict[str, torch.Tensor]    # backbone temporal site name -> (batch, channels, h, w)
    # the tokens' key/value projections in the backbone's reference-attention (Backbone.reference_kv),
    # computed once per avatar at inference; None: projected at every backbone call
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def to(self, device=None, dtype=None) -> "ReferenceFeatures":
        conv = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
        kv = {k: (conv(a), conv(b)) for k, (a, b) in self.kv.items()} if self.kv is not None else None
        return ReferenceFeatures({k: conv(v) for k, v in self.tokens.items()},
                                 {k: conv(v) for k, v in self.sites.items()}, kv)

    @staticmethod
    def cat(items: list["ReferenceFeatures"]) -> "ReferenceFeatures":
        kv = cat_kv([i.kv for i in items]) if all(i.kv is not None for i in items) else None
        return ReferenceFeatures({k: torch.cat([i.tokens[k] for i in items]) for k in items[0].tokens},
                                 {k: torch.cat([i.sites[k] for i in items]) for k in items[0].sites}, kv)


def temporal_sites(unet: UNet2DConditionModel) -> dict[str, str]:
    """Backbone temporal-module name -> the ReferenceNet module whose output sits at the same place.

    diffusers' motion blocks run a temporal module after each (resnet, attention) pair of a CrossAttn block
    and after each resnet of a plain block; the mid block after each attention.
    """
    sites: dict[str, str] = {}
    for part, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        for i, block in enumerate(blocks):
            inner = "attentions" if getattr(block, "attentions", None) is not None else "resnets"
            for j in range(len(getattr(block, inner))):
                sites[f"{part}.{i}.motion_modules.{j}"] = f"{part}.{i}.{inner}.{j}"
    for j in range(len(unet.mid_block.attentions)):
        sites[f"mid_block.motion_modules.{j}"] = f"mid_block.attentions.{j}"
    return sites


class ReferenceNet(nn.Module):
    """diffusers UNet2DConditionModel + write processors on attn1 + hooks at the temporal sites."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.store = ReferenceStore()
        procs = {}
        for name in unet.attn_processors:
            # attn2 sees one null token: its output is a constant (exact shortcut, attention.py)
            procs[name] = ReferenceWriteProcessor(name, self.store) if name.endswith("attn1.processor") \
                else SingleTokenCrossAttnProcessor()
        unet.set_attn_processor(procs)
        modules = dict(unet.named_modules())
        self.site_map = temporal_sites(unet)
        for site, module_name in self.site_map.items():
            modules[module_name].register_forward_hook(self._site_hook(site))

    def _site_hook(self, site: str):
        def hook(module, args, output):
            if self.store.capture_sites:
                self.store.sites[site] = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        return hook

    @property
    def null_context(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def forward(self, latents: torch.Tensor, tokens: bool = True, sites: bool = True) -> ReferenceFeatures:
        """latents (batch, 4, h, w), clean (t = 0) -> ReferenceFeatures.

        The ReferenceNet has no text: its cross-attention sees one all-zero token.
        """
        store = self.store
        store.tokens, store.sites = {}, {}
        store.capture_tokens, store.capture_sites = tokens, sites
        try:
            b = latents.shape[0]
            null = torch.zeros(b, 1, self.null_context, device=latents.device, dtype=latents.dtype)
            t = torch.zeros(b, device=latents.device, dtype=torch.long)
            self.unet(latents, t, encoder_hidden_states=null, return_dict=False)
            return ReferenceFeatures(dict(store.tokens), dict(store.sites))
        finally:
            store.capture_tokens = store.capture_sites = False
            store.tokens, store.sites = {}, {}
