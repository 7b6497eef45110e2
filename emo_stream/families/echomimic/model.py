"""EchoMimicModel: EchoMimic v1 (github antgroup/echomimic) on diffusers/transformers modules.

Parts (attribute names are also the checkpoint key prefixes):
    reference_unet  diffusers UNet2DConditionModel without attn2/norm2 and output head; run once per avatar at
                    t = 0 on the reference latent, its attn1 inputs form the reference bank
    denoiser        diffusers UNetMotionModel (SD1.5 layout + AnimateDiff temporal modules), with EchoMimic's
                    processors (layers.py): reference attention, audio cross-attention x3, per-frame temporal
                    GroupNorm; the face feature is added after conv_in
    face_locator    EchoMimic's FaceLocator (face mask -> 320-channel feature)
    whisper         transformers WhisperEncoder (whisper-tiny) computing the per-layer audio features
    vae             diffusers AutoencoderKL (sd-vae-ft-mse), optional

    model = EchoMimicModel.from_pretrained("ckpt/")          # or registry.load_model("EchoMimic download/")
    bank = model.encode_reference(ref_latents)               # (B, 4, h, w) -> reference bank, once per avatar
    face = model.face_feature(face_mask)                     # (B, 1, H, W) -> (B, 320, 1, h, w)
    tokens = model.audio_tokens(waveform_16k)                # (frames, 50, 384), 24 fps
    v = model.denoise(latents, t, audio, face, with_reference, bank)   # one call, (R, 4, f, h, w)
    latents = sampling.sample(model.denoiser_fn(bank), x, audio[None], face, settings)

Per-call inputs reach the processors through one shared DenoiserContext: a model runs one denoise call at a
time (batch several sessions into one call instead of calling from several threads).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNetMotionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from emo_stream.errors import WeightsError
from emo_stream.blocks.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint  # noqa: F401 (re-exported)
from emo_stream.blocks.checkpoint import load_checkpoint as load_checkpoint_folder
from emo_stream.families.echomimic.audio import WhisperFeatures, audio_tokens
from emo_stream.families.echomimic.config import EchoMimicConfig, config_from_dict
from emo_stream.families.echomimic.layers import (BankReadProcessor, BankStore, BankWriteProcessor, DenoiserContext,
                                                FaceLocator, PerFrameGroupNorm, ScaledCrossAttnProcessor)

log = logging.getLogger(__name__)
LATENT_SCALE = 0.18215   # EchoMimic's pipelines hard-code SD's VAE scaling factor
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def reference_unet_from_config(kwargs: dict) -> UNet2DConditionModel:
    """SD1.5-shaped UNet2DConditionModel as EchoMimic's ReferenceNet: no cross-attention (attn2/norm2) in its
    transformer blocks and no output head (conv_norm_out/conv_out): only its attn1 inputs are used."""
    unet = UNet2DConditionModel(**kwargs)
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.attn2 = None
            module.norm2 = None
    unet.conv_norm_out = None
    unet.conv_act = nn.Identity()
    unet.conv_out = nn.Identity()
    return unet


def denoiser_from_config(kwargs: dict, motion_norm_groups: int = 32) -> UNetMotionModel:
    """UNetMotionModel whose temporal modules normalise per frame with `motion_norm_groups` groups."""
    unet = UNetMotionModel(**kwargs)
    for name, module in unet.named_modules():
        if name.endswith("motion_modules") and isinstance(module, nn.ModuleList):
            for mm in module:
                mm.norm = PerFrameGroupNorm.replacing(mm.norm, motion_norm_groups)
    return unet


class EchoMimicModel(nn.Module):
    def __init__(self, config: EchoMimicConfig, reference_unet: UNet2DConditionModel, denoiser: UNetMotionModel,
                 face_locator: FaceLocator, whisper: WhisperFeatures, vae: AutoencoderKL | None = None):
        super().__init__()
        self.config = config
        self.reference_unet = reference_unet
        self.denoiser = denoiser
        self.face_locator = face_locator
        self.whisper = whisper
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.store = BankStore()
        self.context = DenoiserContext()
        reference_unet.set_attn_processor({name: BankWriteProcessor(name, self.store)
                                           for name in reference_unet.attn_processors})
        procs = {}
        for name in denoiser.attn_processors:
            if ".motion_modules." in name:
                procs[name] = AttnProcessor2_0()
            elif name.endswith("attn1.processor"):
                procs[name] = BankReadProcessor(name, self.context)
            else:
                procs[name] = ScaledCrossAttnProcessor(config.audio.feature_ratio)
        denoiser.set_attn_processor(procs)
        denoiser.conv_in.register_forward_hook(self._add_face)
        # each resnet's time_emb_proj runs on one row per sample, as in EchoMimic's 3D UNet (diffusers'
        # motion UNet repeats the embedding per frame first; a GEMM over f rows rounds differently)
        for m in denoiser.modules():
            proj = getattr(m, "time_emb_proj", None)
            if proj is not None:
                proj.register_forward_pre_hook(self._per_sample_in)
                proj.register_forward_hook(self._per_sample_out)
        self.eval().requires_grad_(False)

    def _per_sample_in(self, _module, args):
        return (args[0][:: self.context.frames], *args[1:])

    def _per_sample_out(self, _module, _args, output):
        return output.repeat_interleave(self.context.frames, dim=0)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, config: EchoMimicConfig, empty: bool = False) -> "EchoMimicModel":
        """Random weights from the config; empty=True: parameters on the meta device (loaded afterwards)."""
        config.validate()
        if empty:
            from emo_stream.blocks.weights import empty_weights

            with empty_weights():
                return cls._build(config)
        return cls._build(config)

    @classmethod
    def _build(cls, config: EchoMimicConfig) -> "EchoMimicModel":
        fl = config.face_locator
        return cls(config, reference_unet_from_config(config.reference_unet),
                   denoiser_from_config(config.denoiser, config.motion_norm_groups),
                   FaceLocator(fl.out_channels, fl.conditioning_channels, fl.channels),
                   WhisperFeatures(config.whisper), AutoencoderKL(**config.vae) if config.vae else None)

    @property
    def device(self) -> torch.device:
        return self.denoiser.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.conv_in.weight.dtype

    # ---- inference pieces ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_reference(self, ref_latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 4, h, w) scaled reference latents -> bank: transformer block name -> (B, h'*w', C) tokens, in the
        config's bank_dtype (EchoMimic's float16 cast)."""
        self.store.tokens, self.store.capture = {}, True
        try:
            x = ref_latents.to(self.device, self.dtype)
            t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
            self.reference_unet(x, t, encoder_hidden_states=None, return_dict=False)
            dt = _DTYPES[self.config.bank_dtype]
            return {k: v.to(dt) for k, v in self.store.tokens.items()}
        finally:
            self.store.capture, self.store.tokens = False, {}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> VAE mean * 0.18215 (EchoMimic's reference latents)."""
        vae = self._need_vae()
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * LATENT_SCALE

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) latents -> (N, 3, H, W) in [-1, 1] (EchoMimic decodes latents / 0.18215 frame by frame)."""
        vae = self._need_vae()
        return vae.decode(latents.to(vae.device, vae.dtype) / LATENT_SCALE).sample

    def _need_vae(self) -> AutoencoderKL:
        if self.vae is None:
            raise WeightsError("this EchoMimic model has no VAE (the download folder had no sd-vae-ft-mse/)")
        return self.vae

    @torch.no_grad()
    def face_feature(self, face_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) or (B, 1, 1, H, W) mask in {0, 1} -> (B, C0, 1, H/8, W/8)."""
        return self.face_locator(face_mask.to(self.device))

    @torch.no_grad()
    def audio_features(self, waveform) -> torch.Tensor:
        """16 kHz mono waveform -> (T, L + 1, 384) whisper features (50 rows per second)."""
        return self.whisper.features(waveform)

    def audio_tokens(self, waveform, num_frames: int | None = None, fps: float | None = None) -> torch.Tensor:
        """16 kHz mono waveform -> (frames, 50, 384) audio tokens (num_frames None: EchoMimic's frame count)."""
        a = self.config.audio
        return audio_tokens(self.audio_features(waveform), fps or self.config.fps, num_frames, a.rows_per_frame,
                            a.rows_before, a.features_per_second)

    def _add_face(self, module, args, output):
        face = self.context.face
        if face is None:
            return None
        return output + face.to(output.dtype).repeat_interleave(self.context.frames, dim=0)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor,
                face: torch.Tensor | None, with_reference: torch.Tensor | None,
                bank: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """One denoiser call (EchoDenoiser contract of emo_stream.families.echomimic.sampling).

        latents (R, 4, f, h, w); timestep scalar; audio (R, f, tokens, 384); face (R, C0, 1, h, w) or None;
        with_reference (R,) bool or None (= all True); bank from encode_reference, B rows, row r uses r % B.
        Returns the v-prediction (R, 4, f, h, w)."""
        r, _, f = latents.shape[:3]
        if audio.shape[:2] != (r, f):
            raise ValueError(f"audio tokens {tuple(audio.shape)} do not match latents {tuple(latents.shape)}")
        ctx = self.context
        if with_reference is not None:
            # the processors split rows by a host-side tuple: a host mask (the sampler's) costs nothing, a
            # device one is read back once here instead of once per attention layer
            with_reference = tuple(bool(u) for u in with_reference.tolist())
            if all(with_reference):
                with_reference = None
        ctx.frames, ctx.bank, ctx.with_reference = f, bank, with_reference
        ctx.face = face[:, :, 0] if face is not None else None
        try:
            tokens = audio.reshape(r * f, *audio.shape[2:]).to(self.device, self.dtype)
            return self.denoiser(latents.to(self.device, self.dtype), timestep, encoder_hidden_states=tokens,
                                 return_dict=False)[0]
        finally:
            ctx.bank = ctx.with_reference = ctx.face = None

    def denoiser_fn(self, bank: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The denoiser callable sampling.sample expects, with this avatar's reference bank."""
        def call(latents, timestep, audio, face, with_reference):
            return self.denoise(latents, timestep, audio, face, with_reference, bank)
        return call

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.yaml (architecture: echomimic-v1, every setting) + model.safetensors (every part)."""
        return save_checkpoint(self, self.config.to_dict(), directory, architecture=self.config.architecture)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "EchoMimicModel":
        """Load a checkpoint written by save_pretrained (WeightsError naming file, key and shape)."""
        return load_checkpoint_folder(directory, lambda data, source: config_from_dict(data, source=source),
                               lambda config: cls.build(config, empty=True), device, dtype)


def load_checkpoint(path: str | Path, device=None, dtype=None, **_) -> EchoMimicModel:
    return EchoMimicModel.from_pretrained(path, device=device, dtype=dtype)
