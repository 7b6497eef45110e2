"""EchoMimic v1 published key names -> our modules' names.

reference_unet.pth   identical to diffusers' UNet2DConditionModel (without attn2/norm2 and the output head)
denoising_unet.pth   identical to diffusers' UNetMotionModel for everything but the temporal modules
motion_module.pth    AnimateDiff-original naming -> diffusers' AnimateDiffTransformer3D naming:
    X.motion_modules.N.temporal_transformer.REST          -> X.motion_modules.N.REST
    transformer_blocks.K.attention_blocks.0 / .1          -> transformer_blocks.K.attn1 / attn2
    transformer_blocks.K.norms.0 / norms.1 / ff_norm      -> transformer_blocks.K.norm1 / norm2 / norm3
    transformer_blocks.K.attention_blocks.J.pos_encoder.pe -> transformer_blocks.K.pos_embed.pe (one sinusoid
                                                             table shared by both attentions in diffusers)
whisper_tiny.pt      see audio.whisper_key
"""

from __future__ import annotations

import re

_MOTION = [(re.compile(r"\.attention_blocks\.(\d+)\.pos_encoder\.pe$"), r".pos_embed.pe"),
           (re.compile(r"\.attention_blocks\.0\."), ".attn1."),
           (re.compile(r"\.attention_blocks\.1\."), ".attn2."),
           (re.compile(r"\.norms\.0\."), ".norm1."),
           (re.compile(r"\.norms\.1\."), ".norm2."),
           (re.compile(r"\.ff_norm\."), ".norm3.")]


def motion_key(key: str) -> str:
    """AnimateDiff-original motion-module key -> diffusers UNetMotionModel key (others unchanged)."""
    k = key.replace(".temporal_transformer.", ".", 1)
    for pattern, new in _MOTION:
        k = pattern.sub(new, k)
    return k


def is_positional_table(key: str) -> bool:
    return key.endswith(".pos_encoder.pe") or key.endswith(".pos_embed.pe")
