"""A tiny MuseTalk download folder with random weights, in the published file formats and layout (tests,
benchmarks, and a starting point for training a MuseTalk-shaped model from scratch).

    root = write_download(tmp / "models", seed=0)     # musetalkV15/, sd-vae/, whisper/, face-parse-bisent/
    model = emo_stream.families.musetalk.loader.load(root)

The UNet, VAE and whisper are shrunken (widths 32-64, two whisper layers of the real 384 width, which
MuseTalk's positional table requires); the face-parsing net is BiSeNet's fixed architecture (random, stored in
float16 as the shared golden set does to stay small).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET = {
    "sample_size": 32, "in_channels": 8, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
                                                                    "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [32, 32, 64], "layers_per_block": 1, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 384, "attention_head_dim": 4, "use_linear_projection": False,
}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 32, "sample_size": 256,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
TINY_WHISPER = {"d_model": 384, "encoder_layers": 2, "encoder_attention_heads": 6, "encoder_ffn_dim": 256,
                "decoder_layers": 1, "decoder_attention_heads": 6, "decoder_ffn_dim": 256, "num_mel_bins": 80,
                "max_source_positions": 1500, "max_target_positions": 32, "vocab_size": 64, "pad_token_id": 0,
                "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1, "begin_suppress_tokens": None,
                "suppress_tokens": None}


def write_download(root: str | Path, seed: int = 0, unet: dict | None = None, parsing_dtype=torch.float16) -> Path:
    """Write MuseTalk's models/ layout with random tiny weights under `root`; returns `root`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from emo_stream.families.musetalk.face_parsing import BiSeNet

    root = Path(root)
    torch.manual_seed(seed)
    (root / "musetalkV15").mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_UNET, **(unet or {}))
    net = UNet2DConditionModel(**cfg)
    (root / "musetalkV15" / "musetalk.json").write_text(json.dumps(cfg, indent=1))
    torch.save(net.state_dict(), root / "musetalkV15" / "unet.pth")

    AutoencoderKL(**TINY_VAE).save_pretrained(root / "sd-vae", safe_serialization=False)

    wcfg = WhisperConfig(**TINY_WHISPER)
    WhisperModel(wcfg).save_pretrained(root / "whisper", safe_serialization=False)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")

    (root / "face-parse-bisent").mkdir(exist_ok=True)
    parser = BiSeNet()
    with torch.no_grad():   # BatchNorm statistics of a trained net, roughly: keeps activations in range
        for m in parser.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(4.0)
    torch.save({k: v.to(parsing_dtype) if v.is_floating_point() else v for k, v in parser.state_dict().items()},
               root / "face-parse-bisent" / "79999_iter.pth")
    # the ImageNet backbone MuseTalk reads before 79999_iter.pth overwrites it: present, as downloaded
    torch.save({k[len("cp.resnet."):]: torch.zeros_like(v) for k, v in parser.state_dict().items()
                if k.startswith("cp.resnet.")}, root / "face-parse-bisent" / "resnet18-5c106cde.pth")
    return root


def label_everything_skin(net) -> None:
    """Make a (random) BiSeNet call every pixel skin, so the paste masks cover the lower face: with random
    weights the parsing net usually finds no skin at all and nothing would be repainted."""
    with torch.no_grad():
        w = net.conv_out.conv_out.weight   # (classes, mid, 1, 1) on post-ReLU (non-negative) features
        w.zero_()
        w[1] = 1.0


# ---- random models in memory (no download): benchmarks, the memory count, the device checks -----------------
# the published whisper-tiny encoder (openai/whisper-tiny's config.json, encoder side)
FULL_WHISPER = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
                "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865}


def random_config(full: bool = True, crop_size: int | None = None):
    """MuseTalkConfig of the published networks (full: SD1.5-sized UNet with 8 input channels, the SD VAE,
    whisper-tiny) or of the tiny test ones."""
    from emo_stream.blocks.flops import sd15_decoders
    from emo_stream.families.musetalk.config import MuseTalkConfig
    from emo_stream.families.musetalk.flops import UNET

    if full:
        cfg = MuseTalkConfig(unet=dict(UNET), vae=dict(sd15_decoders()[0]), whisper=dict(FULL_WHISPER),
                             feature_extractor={"feature_size": 80})
    else:
        cfg = MuseTalkConfig(unet=dict(TINY_UNET), vae=dict(TINY_VAE), whisper=dict(TINY_WHISPER),
                             feature_extractor={"feature_size": 80})
    if crop_size is not None:
        cfg.crop_size = int(crop_size)
    return cfg


def random_model(full: bool = True, device=None, dtype: torch.dtype | None = None, seed: int = 0,
                 crop_size: int | None = None):
    """A MuseTalkModel (eval, no face-parsing net) with random weights, built directly on `device` (meta: no
    memory at all, for counting). Avatars for it come from synthetic_avatar (random parsing finds no face)."""
    from emo_stream.families.musetalk.loader import build_networks

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_networks(random_config(full, crop_size), device or "cpu", dtype)


def synthetic_avatar(model, image, box, frames: int = 1, generator: torch.Generator | None = None,
                     encode: bool = True):
    """A prepared avatar without face detection or parsing: `frames` base frames (the RGB uint8 portrait
    drifting one pixel per frame), the face box `box` (x0, y0, x1, y1) in it, a paste mask over the box's lower
    half (soft top edge), and the crops' latents from the model's VAE (encode=False: zeros of their shape), on
    the model's device. On the meta device only the shapes are made (counting memory)."""
    import numpy as np
    from PIL import Image

    from emo_stream.families.musetalk.avatar import MuseTalkAvatar
    from emo_stream.families.musetalk.blending import BlendPlan

    image = np.asarray(image, np.uint8)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    h, w = y1 - y0, x1 - x0
    mask = np.zeros((h, w), np.uint8)
    ramp = np.clip((np.arange(h) - h / 2) / max(1.0, h / 8), 0, 1)
    mask[:] = (ramp * 255).astype(np.uint8)[:, None]
    dev, c = model.device, model.config.crop_size
    if dev.type == "meta":
        base = torch.empty((frames, *image.shape), dtype=torch.uint8, device=dev)
    else:
        base = torch.from_numpy(np.stack([np.roll(image, i, axis=1) for i in range(frames)])).to(dev)
    if encode:
        crops = np.stack([np.asarray(Image.fromarray(np.roll(image, i, axis=1)[y0:y1, x0:x1]).resize(
            (c, c), Image.LANCZOS)) for i in range(frames)])
        latents = model.latents_for_unet(crops, generator=generator or torch.Generator().manual_seed(0))
    else:
        f = 2 ** (len(model.config.vae.get("block_out_channels", [0] * 4)) - 1)
        latents = torch.zeros(frames, 2 * model.config.vae.get("latent_channels", 4), c // f, c // f, device=dev,
                              dtype=model.dtype)
    plans = [BlendPlan(box=(x0, y0, x1, y1), mask=torch.from_numpy(mask).to(dev)) for _ in range(frames)]
    return MuseTalkAvatar(frames=base, latents=latents, boxes=[(x0, y0, x1, y1)] * frames, plans=plans)
