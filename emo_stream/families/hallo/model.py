"""The Hallo model: ReferenceNet + denoiser + face locator + face / audio projections + wav2vec2, and one
clip's guided DDIM sampling exactly as Hallo's FaceAnimatePipeline runs it.

    model = HalloModel(HalloConfig(), wav2vec2)          # random weights
    model.load_net_state(torch.load("hallo/net.pth", weights_only=True), "hallo/net.pth")
    cond, uncond = model.face_tokens(face_embedding)
    clip = ClipInputs(ref_latents, cond, uncond, model.audio_tokens(audio_windows), masks,
                      model.face_feature(face_region, frames))
    latents = model.sample_clip(noise, clip, steps=40, guidance=3.5)

Guidance batch (Hallo's order): [uncond, cond]. Uncond = face tokens of a zero embedding (imageproj(0),
not zeros), zero audio tokens, zero face-locator feature, no reference attention (self only), same masks,
motion frames from the bank's uncond row. The ReferenceNet runs once per clip on the reference + motion
latents repeated twice, its face tokens tiled as [u, c, u, c, ...] (Hallo's .repeat), so rows pair
r:u, m1:c, m2:u, r:c, m1:u, m2:c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import nn

from emo_stream.errors import WeightsError
from emo_stream.execution import step_timesteps
from emo_stream.families.hallo.config import NET_PREFIXES, HalloConfig
from emo_stream.families.hallo.modules import AudioProj, FaceLocator, ImageProj
from emo_stream.families.hallo.unet import Denoiser, ReferenceNet


@dataclass
class ClipInputs:
    """Conditioning of one clip, for batch 1 (the cond sample); guidance builds the uncond half itself."""

    ref_latents: torch.Tensor       # (1 + n_motion, 4, h, w): reference, then motion frames oldest first
    face_tokens: torch.Tensor       # (1, n, d)
    uncond_face_tokens: torch.Tensor  # (1, n, d) = imageproj(zeros)
    audio_tokens: torch.Tensor      # (1, f, T, D)
    masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]   # per level (full, face, lip), (1, h*w)
    face_feature: torch.Tensor      # (1, C, f, h, w) face-locator output

    @property
    def frames(self) -> int:
        return self.audio_tokens.shape[1]


class HalloModel(nn.Module):
    def __init__(self, config: HalloConfig, wav2vec2: nn.Module | None = None, vae: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vae = vae                  # diffusers AutoencoderKL (sd-vae-ft-mse), not part of net.pth
        self.face_models = None         # download's face_analysis/models (insightface ONNX), if any
        self.reference_unet = ReferenceNet(config.unet)
        self.denoising_unet = Denoiser(config.unet, config.unet_additional_kwargs)
        self.face_locator = FaceLocator(**config.face_locator)
        self.imageproj = ImageProj(**config.imageproj)
        self.audioproj = AudioProj(**config.audioproj)
        self.wav2vec2 = wav2vec2
        self.scheduler = DDIMScheduler(**config.scheduler)

    # ---- weights ---------------------------------------------------------------------------------
    def net_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in net.pth's naming (what Hallo's Net.state_dict() holds)."""
        out = {}
        for prefix, path in NET_PREFIXES.items():
            for k, v in self.get_submodule(path).state_dict().items():
                out[f"{prefix}.{k}"] = v
        return out

    def load_net_state(self, state: dict[str, torch.Tensor], source: str = "net.pth") -> None:
        """Strict load of a net.pth state dict (any float dtype; cast into our modules' dtype).
        A missing / unexpected key or a shape mismatch is one WeightsError line naming `source` and the key."""
        self.check_net_state(state, source)
        for prefix, path in NET_PREFIXES.items():
            module = self.get_submodule(path)
            dtype = next(module.parameters()).dtype
            sub = {k[len(prefix) + 1:]: v.to(dtype) for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub, strict=True)

    def check_net_state(self, state: dict[str, torch.Tensor], source: str = "net.pth") -> None:
        """The keys and shapes of a net.pth state dict against this model (works on the meta device)."""
        own = self.net_state_dict()
        for key, value in own.items():
            if key not in state:
                raise WeightsError(f"{source}: missing tensor {key} (shape {tuple(value.shape)}); "
                                   f"{sum(k not in state for k in own)} missing in all")
            if tuple(state[key].shape) != tuple(value.shape):
                raise WeightsError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, "
                                   f"the model needs {tuple(value.shape)} (a different model size?)")
        extra = [k for k in state if k not in own]
        if extra:
            raise WeightsError(f"{source}: unexpected tensor {extra[0]} (shape {tuple(state[extra[0]].shape)}); "
                               f"{len(extra)} unexpected in all (not a Hallo net.pth?)")

    # ---- conditioning ----------------------------------------------------------------------------
    def face_tokens(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 512) face embedding -> (cond tokens, uncond tokens = imageproj(zeros))."""
        return self.imageproj(embedding), self.imageproj(torch.zeros_like(embedding))

    def audio_tokens(self, windows: torch.Tensor) -> torch.Tensor:
        """(f, window, layers, dim) -> (1, f, tokens, dim)."""
        return self.audioproj(windows[None])

    def face_feature(self, face_region: torch.Tensor, frames: int) -> torch.Tensor:
        """(3, H, W) face-region image in {0, 1} -> (1, C, frames, H/8, W/8), the same for every frame."""
        return self.face_locator(face_region[None, :, None].repeat(1, 1, frames, 1, 1))

    # ---- one denoiser call -----------------------------------------------------------------------
    def _bank_dtype(self) -> torch.dtype | None:
        return None if self.config.bank_dtype in ("", "none", "float32") else getattr(torch, self.config.bank_dtype)

    def prepare_reference(self, clip: ClipInputs, guided: bool) -> None:
        """Run the ReferenceNet once for the clip and hand its bank to the denoiser."""
        ref = clip.ref_latents
        if guided:
            ref = ref.repeat(2, 1, 1, 1)
            tokens = torch.cat([clip.uncond_face_tokens, clip.face_tokens], dim=0)
        else:
            tokens = clip.face_tokens
        tokens = tokens.repeat(ref.shape[0] // tokens.shape[0], 1, 1)     # Hallo's pairing quirk
        bank = self.reference_unet(ref, tokens)
        self.denoising_unet.load_bank(bank, self._bank_dtype())

    def _masks(self, clip: ClipInputs, samples: int) -> list[tuple[torch.Tensor, ...]]:
        f = clip.frames
        return [tuple(m.reshape(1, -1).repeat(f * samples, 1) for m in level) for level in clip.masks]

    def denoise(self, latents: torch.Tensor, t: torch.Tensor | int, clip: ClipInputs,
                guided: bool) -> torch.Tensor:
        """One denoiser call (bank already prepared). Guided: latents (1, ...) -> (2, ...) [uncond, cond]."""
        scales = tuple(self.config.motion_scale)
        if not guided:
            return self.denoising_unet(latents, t, clip.face_tokens, clip.audio_tokens, self._masks(clip, 1),
                                       clip.face_feature, scales, guided=False)
        return self.denoising_unet(
            torch.cat([latents, latents]), t,
            torch.cat([clip.uncond_face_tokens, clip.face_tokens]),
            torch.cat([torch.zeros_like(clip.audio_tokens), clip.audio_tokens]),
            self._masks(clip, 2),
            torch.cat([torch.zeros_like(clip.face_feature), clip.face_feature]),
            scales, guided=True)

    # ---- pixels <-> latents (the download's sd-vae-ft-mse) ------------------------------------------
    def _need_vae(self):
        if self.vae is None:
            raise WeightsError("this Hallo model has no VAE (the download's sd-vae-ft-mse folder is missing)")
        return self.vae

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, 4, H/8, W/8): VAE posterior mean * 0.18215 (as Hallo)."""
        vae = self._need_vae()
        p = next(vae.parameters())
        return vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean * 0.18215

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(n, 4, h, w) -> (n, 3, H, W) in [0, 1], one frame per VAE call (as Hallo's decode_latents)."""
        vae = self._need_vae()
        p = next(vae.parameters())
        out = [vae.decode(x.to(p.device, p.dtype) / 0.18215).sample for x in latents.split(1)]
        return (torch.cat(out) / 2 + 0.5).clamp(0, 1)

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_clip(self, latents: torch.Tensor, clip: ClipInputs, steps: int | None = None,
                    guidance: float | None = None, callback=None) -> torch.Tensor:
        """DDIM (eta 0) from `latents` (1, 4, f, h, w) already scaled by init_noise_sigma -> final latents.
        `callback(i, t, model_output, uncond, cond)` sees every step (parity uses it)."""
        steps = steps or self.config.steps
        guidance = self.config.guidance if guidance is None else guidance
        guided = guidance > 1.0
        timesteps = step_timesteps(self.scheduler, steps, latents.device)
        self.prepare_reference(clip, guided)
        # the per-step loop: no host sync in it (the scheduler gets host ints, the model device tensors)
        for i, (t_host, t) in enumerate(timesteps):
            x = self.scheduler.scale_model_input(latents, t_host)
            pred = self.denoise(x, t, clip, guided)
            if guided:
                uncond, cond = pred.chunk(2)
                out = uncond + guidance * (cond - uncond)
            else:
                uncond, cond, out = None, pred, pred
            if callback is not None:
                callback(i, t, out, uncond, cond)
            latents = self.scheduler.step(out, t_host, latents, eta=0.0, return_dict=False)[0]
        return latents
