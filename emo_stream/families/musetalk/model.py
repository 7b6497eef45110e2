"""MuseTalk 1.5 as one module: whisper-tiny encoder, SD VAE, the 8-channel UNet and the face-parsing net.

One frame = one UNet call at t = 0 (no sampling loop): the input is the VAE latents of the face crop with its
lower half blanked (what to repaint) next to the latents of a reference crop (who it is), conditioned by the
frame's whisper prompt plus a sinusoidal position table; the output latents are decoded to the new crop.

    model = load("models/")                                    # emo_stream.families.musetalk.loader
    chunks = model.audio_chunks(wav16k, fps=25)                # (frames, 10 x 5, 384)
    lat = model.latents_for_unet(crops_rgb, generator=g)       # (n, 8, h/8, w/8): masked + reference
    crops = model.render(lat, chunks)                          # (n, crop, crop, 3) uint8 RGB, on the device

`render` = `denoise` (positional encoding + UNet) then `decode` (VAE, to uint8 on the device): the batched
call the live path makes with every session's frames at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from emo_stream.families.musetalk import audio as audio_mod
from emo_stream.families.musetalk.config import MuseTalkConfig


def sinusoid_table(dim: int, length: int) -> torch.Tensor:
    """(1, length, dim): MuseTalk's PositionalEncoding buffer (sin on even channels, cos on odd)."""
    pos = torch.arange(0, length, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe[None]


class MuseTalkModel(nn.Module):
    def __init__(self, config: MuseTalkConfig, unet: nn.Module, vae: nn.Module, whisper_encoder: nn.Module,
                 extractor, parser=None):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.whisper = whisper_encoder
        self.extractor = extractor   # transformers WhisperFeatureExtractor (numpy; not a module)
        self.parser = parser         # face_parsing.FaceParser (CPU, at avatar preparation), or None
        self.register_buffer("pe", sinusoid_table(config.pe_dim, config.pe_max_len), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor)

    def to_runtime(self, device=None, dtype: torch.dtype | None = None) -> "MuseTalkModel":
        """Move to `device`; the UNet, VAE and whisper in `dtype` (fp16/bf16 on CUDA), the parser in float32."""
        for m in (self.unet, self.vae, self.whisper):
            m.to(device=device) if dtype is None else m.to(device=device, dtype=dtype)
        self.pe = self.pe.to(device)
        if self.parser is not None:
            self.parser.net.to(device=device, dtype=torch.float32)
        return self

    # ---- audio -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def audio_states(self, wav: np.ndarray) -> torch.Tensor:
        """(steps, layers + 1, d) whisper states of a whole 16 kHz file (MuseTalk's get_audio_feature + encoder)."""
        return audio_mod.file_states(self.whisper, self.extractor, wav)

    @torch.no_grad()
    def audio_chunks(self, wav: np.ndarray, fps: int = 25) -> torch.Tensor:
        """(frames, width x (layers + 1), d): every frame's audio prompt for a whole file (get_whisper_chunk)."""
        c = self.config
        return audio_mod.file_chunks(self.whisper, self.extractor, wav, fps, c.audio_padding_left,
                                     c.audio_padding_right)

    # ---- latents -----------------------------------------------------------------------------------------
    def _pixels(self, crops_rgb: torch.Tensor, half_mask: bool) -> torch.Tensor:
        """(n, s, s, 3) uint8 RGB -> (n, 3, s, s) in [-1, 1], lower half black (-1) when half_mask."""
        # float64 /255 as the reference's numpy; contiguous NCHW: a channels-last input takes other CPU kernels
        # whose results differ by up to ~1e-2 in the latents
        x = crops_rgb.permute(0, 3, 1, 2).contiguous().double().div(255.0).float()
        if half_mask:
            x = x.clone()
            x[:, :, x.shape[2] // 2:] = 0
        return (x - 0.5) / 0.5

    @torch.no_grad()
    def latents_for_unet(self, crops_rgb: torch.Tensor | np.ndarray, generator: torch.Generator | None = None,
                         sample: bool = True) -> torch.Tensor:
        """(n, 8, s/8, s/8): cat(masked, reference) VAE latents x scaling factor of (n, s, s, 3) uint8 RGB crops.

        sample: draw from the posterior as MuseTalk does (masked then whole, frame after frame, from
        `generator`, which plays the role of torch's global generator after torch.manual_seed); False: means."""
        crops = torch.as_tensor(np.asarray(crops_rgb)) if not torch.is_tensor(crops_rgb) else crops_rgb
        out = []
        for crop in crops:
            pair = []
            for half in (True, False):
                x = self._pixels(crop[None], half).to(device=self.vae.device, dtype=self.vae.dtype)
                dist = self.vae.encode(x).latent_dist
                z = dist.sample(generator=generator) if sample else dist.mean
                pair.append(z * self.scaling_factor)
            out.append(torch.cat(pair, dim=1))
        return torch.cat(out, dim=0)

    # ---- one batched call ----------------------------------------------------------------------------------
    def with_positions(self, chunks: torch.Tensor) -> torch.Tensor:
        """MuseTalk's PositionalEncoding: chunks + the sinusoid table (same dtype as the chunks)."""
        return chunks + self.pe[:, : chunks.shape[1]].to(chunks.dtype)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """(n, 8, h, w) latents + (n, tokens, d) audio prompts -> (n, 4, h, w) predicted latents (UNet at t=0)."""
        dev, dt = self.device, self.dtype
        t = torch.zeros((), device=dev, dtype=torch.long)
        return self.unet(latents.to(dev, dt), t, encoder_hidden_states=self.with_positions(chunks.to(dev, dt))).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(n, 4, h, w) -> (n, s, s, 3) uint8 RGB on the model's device (MuseTalk's decode_latents, less the
        trip to numpy and the swap to BGR)."""
        x = self.vae.decode((latents * (1 / self.scaling_factor)).to(self.vae.dtype)).sample
        x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        return (x * 255).round().to(torch.uint8)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """One batched UNet + decode: (n, 8, h, w), (n, tokens, d) -> (n, s, s, 3) uint8 RGB crops."""
        return self.decode(self.denoise(latents, chunks))
