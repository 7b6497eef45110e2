"""Hallo's two UNets as diffusers UNet2DConditionModel plus processors and hooks (no forked UNet).

ReferenceNet: a UNet2DConditionModel without conv_norm_out / conv_out (Hallo's has none). Its spatial
self-attentions (attn1) get a write processor that keeps the normalised hidden states they see (the "bank").

Denoiser: a UNet2DConditionModel run on all frames at once (batch = samples x frames), which is exactly
Hallo's UNet3DConditionModel for everything per-frame (its "inflated" convs and group norms). Hallo's extra
modules are attached under the same names as in net.pth (`down_blocks.0.audio_modules.0`,
`...motion_modules.0`) and run from a forward hook on each spatial transformer, in the order Hallo's
inference really uses (training mode + gradient checkpointing, see golden README):

    resnet -> spatial transformer (attn1 with the reference bank, attn2 on face tokens, FF)
           -> audio module (masked full / face / lip cross-attentions, level of the block)
           -> motion module over [motion-frame features ++ frames]; the motion outputs are dropped

Blocks without spatial transformers (down_blocks.3, up_blocks.0) run only their resnets, so their motion
modules hold weights that never run (as in Hallo). The face-locator feature is added after conv_in by a
hook.

Bank quirks reproduced on purpose (they change the output):
- the bank is rounded to float16 when it is handed from the ReferenceNet to the denoiser;
- reference rows are tiled over the denoiser's (sample, frame) rows, not repeated per sample: with guidance
  the cond frames alternate between the bank's uncond and cond reference rows;
- the uncond half attends to itself only; motion frames come from the bank rows after the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from emo_stream.families.hallo.modules import AudioModule, MotionModule, attend

_BLOCK_2D = {"CrossAttnDownBlock3D": "CrossAttnDownBlock2D", "DownBlock3D": "DownBlock2D",
             "CrossAttnUpBlock3D": "CrossAttnUpBlock2D", "UpBlock3D": "UpBlock2D",
             "UNetMidBlock3DCrossAttn": "UNetMidBlock2DCrossAttn"}
_UNET_KEYS = {"sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos",
              "freq_shift", "down_block_types", "mid_block_type", "up_block_types", "block_out_channels",
              "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
              "norm_eps", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
              "upcast_attention", "only_cross_attention", "dual_cross_attention", "resnet_time_scale_shift"}


def unet_2d(config: dict[str, Any]) -> UNet2DConditionModel:
    """UNet2DConditionModel from an SD-style config; 3D block names map to their 2D twins."""
    kwargs = {k: v for k, v in config.items() if k in _UNET_KEYS}
    for key in ("down_block_types", "up_block_types"):
        kwargs[key] = [_BLOCK_2D.get(t, t) for t in kwargs[key]]
    kwargs["mid_block_type"] = _BLOCK_2D.get(kwargs.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
                                             kwargs.get("mid_block_type", "UNetMidBlock2DCrossAttn"))
    return UNet2DConditionModel(**kwargs)


# ---- reference bank ---------------------------------------------------------------------------------
@dataclass
class BankSlot:
    """The reference tokens of one spatial transformer block: written by the ReferenceNet, read by the
    denoiser's block of the same name."""

    bank: torch.Tensor | None = None    # (reference rows, tokens, channels)


@dataclass
class RunState:
    """Per-call inputs the processors and hooks need (diffusers passes nothing extra to them)."""

    frames: int = 1
    guided: bool = False                      # batch is [uncond, cond]
    audio: torch.Tensor | None = None         # (samples * frames, tokens, dim)
    masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per level
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    face_feature: torch.Tensor | None = None  # (samples * frames, C, h, w), added after conv_in


class BankWriteProcessor:
    def __init__(self, slot: BankSlot):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        self.slot.bank = hidden_states.detach().clone()
        return attend(attn, hidden_states)


class BankReadProcessor:
    def __init__(self, slot: BankSlot, state: RunState):
        self.slot = slot
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        bank = self.slot.bank
        if bank is None:
            raise RuntimeError("denoiser called before the ReferenceNet filled its bank")
        rows = hidden_states.shape[0]
        samples = rows // self.state.frames
        ref = bank.reshape(samples, bank.shape[0] // samples, *bank.shape[1:])[:, 0]
        ref = ref.repeat(self.state.frames, 1, 1)           # tiled, as Hallo's .repeat does (see module doc)
        out = attend(attn, hidden_states, torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1))
        if self.state.guided:
            half = rows // 2
            out = torch.cat([attend(attn, hidden_states[:half]), out[half:]], dim=0)
        return out


MOTION_NORM_GROUPS = 32


def resnet_in_hallo_layout(resnet: nn.Module, frames: Callable[[], int]) -> Callable[..., torch.Tensor]:
    """A forward for one of the denoiser's resnets that, at a level whose height or width is 1, runs its
    elementwise ops on Hallo's 5D (b, c, f, h, w) view and each 2D op on the (b f, c, h, w) view of that.

    Where a spatial size is 1, the strides of that dim are free: Hallo's 5D tensor keeps the ones the last
    2D op gave (its elementwise ops see a non-contiguous 5D tensor and keep its strides), while the same ops
    on our 4D tensor see a "contiguous" one and reset them. The values are equal, but convolutions and group
    norms pick their channels-last or contiguous kernels by these strides, which round differently (5e-8),
    and the single-value group norms of a 1x1 level turn that into 1e-3 (32 px images: levels 4, 2, 1, 1).
    Elsewhere layouts are unambiguous and the stock forward computes the same thing."""
    stock = resnet.forward
    if resnet.upsample is not None or resnet.downsample is not None or resnet.time_embedding_norm != "default":
        return stock   # (not in an SD UNet's resnets)

    def forward(x: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        if x.dim() != 4 or (x.shape[-1] != 1 and x.shape[-2] != 1):
            return stock(x, temb, *args, **kwargs)
        f = frames()
        b = x.shape[0] // f

        def to5(t):   # "(b f) c h w -> b c f h w"
            return t.reshape(b, f, *t.shape[1:]).permute(0, 2, 1, 3, 4)

        def per_frame(op, t5):   # a 2D op on "b c f h w -> (b f) c h w", back to 5D
            return to5(op(t5.permute(0, 2, 1, 3, 4).reshape(b * f, *t5.shape[1:2], *t5.shape[3:])))

        x5 = to5(x)
        h = resnet.nonlinearity(per_frame(resnet.norm1, x5))
        h = per_frame(resnet.conv1, h)
        if temb is not None and resnet.time_emb_proj is not None:
            t = resnet.time_emb_proj(resnet.nonlinearity(temb))[::f]   # one row per sample (see _per_sample_*)
            h = h + t[:, :, None, None, None]
        h = resnet.nonlinearity(per_frame(resnet.norm2, h))
        h = per_frame(resnet.conv2, resnet.dropout(h))
        if resnet.conv_shortcut is not None:
            x5 = per_frame(resnet.conv_shortcut, x5)
        out = (x5 + h) / resnet.output_scale_factor
        return out.permute(0, 2, 1, 3, 4).reshape(b * f, *out.shape[1:2], *out.shape[3:])

    return forward


def motion_features(bank: torch.Tensor, samples: int, h: int, w: int) -> torch.Tensor:
    """Bank rows after each sample's reference row -> (samples, c, n_motion, h, w)."""
    x = bank.reshape(samples, bank.shape[0] // samples, *bank.shape[1:])[:, 1:]   # (s, nm, h*w, c)
    s, nm, _, c = x.shape
    return x.reshape(s, nm, h, w, c).permute(0, 4, 1, 2, 3)


def _transformers(unet: UNet2DConditionModel) -> list[tuple[str, nn.Module]]:
    """(name, Transformer2DModel) of every spatial transformer, in module order."""
    return [(n, m) for n, m in unet.named_modules()
            if n.split(".")[-2:-1] == ["attentions"] and hasattr(m, "transformer_blocks")]


def _level(name: str, n_levels: int) -> int:
    """Mask level of a block (Hallo's `depth`): down_blocks.i -> i, mid -> last, up_blocks.i -> last - i."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return n_levels - 1
    return n_levels - 1 - int(parts[1])


# ---- the two networks -------------------------------------------------------------------------------
class ReferenceNet(nn.Module):
    """Hallo's reference UNet; `forward` fills `slots` (one per spatial transformer block)."""

    def __init__(self, unet_config: dict[str, Any]):
        super().__init__()
        self.unet = unet_2d(unet_config)
        del self.unet.conv_norm_out, self.unet.conv_out   # absent in Hallo's reference UNet
        self.unet.conv_norm_out = None
        self.unet.conv_out = nn.Identity()
        self.slots: dict[str, BankSlot] = {}
        procs = {}
        for name in self.unet.attn_processors:
            if ".attn1." in name:
                block = name.rsplit(".attn1.", 1)[0]
                self.slots[block] = BankSlot()
                procs[name] = BankWriteProcessor(self.slots[block])
            else:
                procs[name] = self.unet.attn_processors[name]
        self.unet.set_attn_processor(procs)

    def forward(self, latents: torch.Tensor, face_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """latents (R, 4, h, w) at t=0; face_tokens (R, n, d) already paired row by row -> bank per block."""
        t = torch.zeros((), dtype=torch.long, device=latents.device)
        self.unet(latents, t, encoder_hidden_states=face_tokens, return_dict=False)
        return {name: slot.bank for name, slot in self.slots.items()}


class Denoiser(nn.Module):
    """Hallo's denoising UNet (see module doc). `self.unet` state-dict keys equal net.pth's denoising_unet."""

    def __init__(self, unet_config: dict[str, Any], additional: dict[str, Any]):
        super().__init__()
        self.unet = unet_2d(unet_config)
        self.state = RunState()
        self.slots: dict[str, BankSlot] = {}
        cfg = self.unet.config
        heads = cfg.attention_head_dim if isinstance(cfg.attention_head_dim, int) else cfg.attention_head_dim[0]
        chans = list(cfg.block_out_channels)
        groups = cfg.norm_num_groups
        audio_dim = additional.get("audio_attention_dim", 768)
        mm_kwargs = dict(additional.get("motion_module_kwargs") or {})
        resolutions = additional.get("motion_module_resolutions", [1, 2, 4, 8])
        use_motion = additional.get("use_motion_module", True)
        use_audio = additional.get("use_audio_module", True)
        self.n_levels = len(chans)

        def motion(c: int) -> MotionModule:
            # AnimateDiff's TemporalTransformer3DModel keeps its default 32 norm groups whatever the UNet's
            # norm_num_groups (VanillaTemporalModule does not pass it on)
            return MotionModule(c, norm_groups=MOTION_NORM_GROUPS, **mm_kwargs)

        # attach audio / motion modules under Hallo's names (channel rules of its UNet3DConditionModel)
        for i, block in enumerate(self.unet.down_blocks):
            out_c = chans[i]
            in_c = chans[max(i - 1, 0)]
            n = len(block.resnets)
            if use_motion and 2 ** i in resolutions:
                block.motion_modules = nn.ModuleList(motion(out_c) for _ in range(n))
            if hasattr(block, "attentions") and use_audio:
                inner = [heads * ((in_c if j == 0 else out_c) // heads) for j in range(n)]
                block.audio_modules = nn.ModuleList(AudioModule(out_c, d, heads, audio_dim, groups) for d in inner)
        mid = self.unet.mid_block
        if use_audio:
            mid.audio_modules = nn.ModuleList([AudioModule(chans[-1], heads * (chans[-1] // heads), heads,
                                                           audio_dim, groups)])
        if use_motion and additional.get("motion_module_mid_block", True):
            mid.motion_modules = nn.ModuleList([motion(chans[-1])])
        rev = chans[::-1]
        for i, block in enumerate(self.unet.up_blocks):
            out_c = rev[i]
            in_c = rev[min(i + 1, len(chans) - 1)]
            n = len(block.resnets)
            if use_motion and 2 ** (len(chans) - 1 - i) in resolutions:
                block.motion_modules = nn.ModuleList(motion(out_c) for _ in range(n))
            if hasattr(block, "attentions") and use_audio:
                block.audio_modules = nn.ModuleList(AudioModule(out_c, heads * (in_c // heads), heads, audio_dim,
                                                                groups) for _ in range(n))

        procs = {}
        for name in self.unet.attn_processors:
            if ".attn1." in name and ".transformer_blocks." in name and "_modules." not in name:
                block_name = name.rsplit(".attn1.", 1)[0]
                self.slots[block_name] = BankSlot()
                procs[name] = BankReadProcessor(self.slots[block_name], self.state)
            else:
                procs[name] = self.unet.attn_processors[name]
        self.unet.set_attn_processor(procs)

        for name, transformer in _transformers(self.unet):
            parent = self.unet.get_submodule(name.rsplit(".attentions.", 1)[0])
            index = int(name.rsplit(".", 1)[1])
            transformer.register_forward_hook(self._after_transformer(name, parent, index))
        self.unet.conv_in.register_forward_hook(self._after_conv_in)
        for resnet in [m for m in self.unet.modules() if isinstance(m, ResnetBlock2D)]:
            resnet.forward = resnet_in_hallo_layout(resnet, lambda: self.state.frames)
        # the timestep embedding and each resnet's projection of it run once per sample, not per frame:
        # Hallo's 3D UNet sees batch `samples` there, and a GEMM over 1 row rounds differently from one over
        # `frames` rows (1e-7, which the 1x1 level's single-value group norms turn into 1e-3)
        for module in [self.unet.time_embedding] + [m.time_emb_proj for m in self.unet.modules()
                                                     if getattr(m, "time_emb_proj", None) is not None]:
            module.register_forward_pre_hook(self._per_sample_in)
            module.register_forward_hook(self._per_sample_out)

    # -- hooks ---------------------------------------------------------------------------------------
    def _per_sample_in(self, _module, args):
        return (args[0][:: self.state.frames], *args[1:])

    def _per_sample_out(self, _module, _args, output):
        return output.repeat_interleave(self.state.frames, dim=0)

    def _after_conv_in(self, _module, _args, output):
        if self.state.face_feature is None:
            return output
        return output + self.state.face_feature.to(output.dtype)

    def _after_transformer(self, name: str, parent: nn.Module, index: int):
        level = _level(name, self.n_levels)
        slot = self.slots[f"{name}.transformer_blocks.0"]
        audio_modules = getattr(parent, "audio_modules", None)
        motion_modules = getattr(parent, "motion_modules", None)

        def hook(_module, _args, output):
            st = self.state
            x = output[0]
            rows, c, h, w = x.shape
            if audio_modules is not None:
                x = audio_modules[index](x, st.audio, st.masks[level], st.scales)
            if motion_modules is not None:
                samples = rows // st.frames
                mf = motion_features(slot.bank, samples, h, w).to(x.dtype)
                video = x.reshape(samples, st.frames, c, h, w).transpose(1, 2)
                video = motion_modules[index](torch.cat([mf, video], dim=2))[:, :, mf.shape[2]:]
                x = video.transpose(1, 2).reshape(rows, c, h, w)
            return (x, *output[1:])

        return hook

    # -- call ----------------------------------------------------------------------------------------
    def load_bank(self, bank: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.float16) -> None:
        """Hand the ReferenceNet's bank over (rounded through `dtype` like Hallo's update(); None keeps it)."""
        for name, slot in self.slots.items():
            v = bank[name]
            slot.bank = v if dtype is None else v.to(dtype).to(v.dtype)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | int, face_tokens: torch.Tensor,
                audio_tokens: torch.Tensor, masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                face_feature: torch.Tensor | None, scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
                guided: bool = False) -> torch.Tensor:
        """latents (b, 4, f, h, w); face_tokens (b, n, d); audio_tokens (b, f, T, D); masks per level:
        (full, face, lip) each (b * f, h_k * w_k); face_feature (b, C, f, h, w) or None -> (b, 4, f, h, w)."""
        b, c, f, h, w = latents.shape
        st = self.state
        st.frames, st.guided, st.scales = f, guided, tuple(float(s) for s in scales)
        st.audio = audio_tokens.reshape(b * f, *audio_tokens.shape[2:])
        st.masks = masks
        st.face_feature = None if face_feature is None else face_feature.transpose(1, 2).reshape(
            b * f, *face_feature.shape[1:2], *face_feature.shape[3:])
        x = latents.transpose(1, 2).reshape(b * f, c, h, w)
        ehs = face_tokens.repeat_interleave(f, dim=0)
        try:
            out = self.unet(x, timestep, encoder_hidden_states=ehs, return_dict=False)[0]
        finally:
            st.audio, st.masks, st.face_feature = None, [], None
        return out.reshape(b, f, *out.shape[1:]).transpose(1, 2)
