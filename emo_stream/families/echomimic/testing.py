"""A tiny random EchoMimic v1 download folder, in the published files' formats, for tests and CI.

    write_tiny_echomimic_folder(tmp / "EchoMimic")          # acc set; weights_set="normal" for the other names

Writes what `huggingface-cli download BadToBest/EchoMimic ...` gives (reference_unet.pth, face_locator.pth,
denoising_unet[_acc].pth + motion_module[_acc].pth with AnimateDiff-original motion keys and their sinusoid
tables, audio_processor/whisper_tiny.pt in OpenAI's {"dims", "model_state_dict"} fp16 layout, sd-vae-ft-mse/ as
a diffusers folder), at a tiny size, from a randomly initialised EchoMimicModel whose layers are all live
(every weight perturbed, so zero-initialised outputs such as the temporal layers' do act). Key names are the
inverse of the importer's (keys.motion_key, audio.whisper_key), so loading the folder through the importer
gives back exactly the model that wrote it (tested).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from emo_stream.families.echomimic.audio import _WHISPER_BLOCK
from emo_stream.families.echomimic.config import EchoMimicConfig, FaceLocatorConfig, sd15_denoiser, sd15_reference_unet

# whisper-tiny's width and context are fixed by EchoMimic's code (reshape(-1, 384), 1500 positions, 80 mels)
TINY_WHISPER = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=1)
_MOTION_BACK = [(re.compile(r"\.attn1\."), ".attention_blocks.0."), (re.compile(r"\.attn2\."), ".attention_blocks.1."),
                (re.compile(r"\.norm1\."), ".norms.0."), (re.compile(r"\.norm2\."), ".norms.1."),
                (re.compile(r"\.norm3\."), ".ff_norm.")]
_MOTION_MODULE = re.compile(r"(\.motion_modules\.\d+\.)")


def tiny_config(channels: int = 32, levels: int = 4, weights_set: str = "acc") -> EchoMimicConfig:
    """SD1.5 layout at `channels` per level (8 heads, 32 groups: what the importer assumes), 1 layer per block."""
    ch = [channels] * levels
    cfg = EchoMimicConfig(reference_unet=sd15_reference_unet(ch, 1), denoiser=sd15_denoiser(ch, 1),
                          whisper=dict(TINY_WHISPER),
                          face_locator=FaceLocatorConfig(channels=[4, 8, 16, 16], out_channels=channels))
    cfg.weights_set = weights_set
    return cfg.validate()


def published_motion_key(key: str) -> str:
    """diffusers UNetMotionModel motion key -> AnimateDiff-original (inverse of keys.motion_key)."""
    k = _MOTION_MODULE.sub(r"\1temporal_transformer.", key, count=1)
    for pattern, new in _MOTION_BACK:
        k = pattern.sub(new, k)
    return k


def published_whisper_key(key: str) -> str:
    """WhisperEncoder key -> OpenAI whisper key (inverse of audio.whisper_key)."""
    if key == "embed_positions.weight":
        return "encoder.positional_embedding"
    if key.startswith("layer_norm."):
        return "encoder.ln_post." + key[len("layer_norm."):]
    if key.startswith("layers."):
        _, n, rest = key.split(".", 2)
        for old, new in _WHISPER_BLOCK.items():
            if rest.startswith(new + "."):
                return f"encoder.blocks.{n}.{old}.{rest[len(new) + 1:]}"
    return "encoder." + key


def live_model(config: EchoMimicConfig, seed: int = 0, std: float = 0.05):
    """A random EchoMimicModel with every weight perturbed (zero-initialised layers become live)."""
    from emo_stream.families.echomimic.model import EchoMimicModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EchoMimicModel.build(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("vae."):
                    p.add_(torch.randn_like(p) * std)
                if name.startswith("whisper."):   # OpenAI's tiny.pt is float16: keep what the file can hold
                    p.copy_(p.half().float())
    return model


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A tiny random AutoencoderKL (8x downsampling, 4 latent channels) as a diffusers folder (sd-vae-ft-mse/)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=4,
                            layers_per_block=1)
    vae.save_pretrained(folder)
    return Path(folder)


def published_files(model, weights_set: str = "acc") -> dict[str, dict]:
    """An EchoMimicModel's weights as the published files: {path in the download folder: what torch.save
    writes there} (the inverse of the importer; no VAE)."""
    from emo_stream.families.echomimic.importer import FACE_LOCATOR, REFERENCE, WEIGHT_SETS

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    denoiser_file, motion_file = WEIGHT_SETS[weights_set]
    den = part("denoiser.")
    motion = {}
    for k, v in den.items():
        if ".motion_modules." not in k:
            continue
        if k.endswith(".pos_embed.pe"):   # AnimateDiff stores one table per temporal attention
            base = published_motion_key(k[: -len("pos_embed.pe")])
            for j in (0, 1):
                motion[f"{base}attention_blocks.{j}.pos_encoder.pe"] = v
        else:
            motion[published_motion_key(k)] = v
    whisper = {published_whisper_key(k): v.half() for k, v in part("whisper.encoder.").items()}
    # OpenAI's dims also describe the text decoder, which EchoMimic never runs (and the file here omits)
    dims = dict(model.config.whisper, n_vocab=64, n_text_ctx=16, n_text_state=64, n_text_head=2, n_text_layer=1)
    return {REFERENCE: part("reference_unet."), FACE_LOCATOR: part("face_locator."),
            denoiser_file: {k: v for k, v in den.items() if ".motion_modules." not in k}, motion_file: motion,
            "audio_processor/whisper_tiny.pt": {"dims": dims, "model_state_dict": whisper}}


def write_tiny_echomimic_folder(folder: str | Path, weights_set: str = "acc", seed: int = 0, channels: int = 32,
                                vae: bool = True):
    """Write a tiny EchoMimic download folder; returns the model it holds (for comparisons)."""
    folder = Path(folder)
    model = live_model(tiny_config(channels, weights_set=weights_set), seed)
    for name, content in published_files(model, weights_set).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(content, folder / name)
    if vae:
        write_tiny_vae(folder / "sd-vae-ft-mse", seed)
    return model
