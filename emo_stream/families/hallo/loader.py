"""Hallo / Hallo2 weights: the download folders as published, and our own converted checkpoint.

Download layout (huggingface-cli download fudan-generative-ai/hallo | /hallo2 --local-dir pretrained_models):

    pretrained_models/
      hallo/net.pth  or  hallo2/net.pth (+ net_g.pth, Hallo2's super-resolution, unused here)
      wav2vec/wav2vec2-base-960h/        config.json, model.safetensors, preprocessor_config.json, ...
      sd-vae-ft-mse/                     config.json, diffusion_pytorch_model.safetensors
      stable-diffusion-v1-5/unet/        config.json (+ weights, not needed: net.pth holds both UNets)
      face_analysis/models/              insightface ONNX (glintr100.onnx = ArcFace recognition), mediapipe
      motion_module/mm_sd_v15_v2.ckpt    (not needed: net.pth holds the trained motion modules)
      audio_separator/Kim_Vocal_2.onnx   (vocal separation; not run here, see docs/model.md)

`--model` may name pretrained_models/ itself or its hallo/ or hallo2/ subfolder.

Our checkpoint (`emo-stream convert`): config.yaml (architecture: hallo) + net.safetensors (net.pth's keys,
dtype as stored) + wav2vec2/ (config.json + model.safetensors) + vae/ when the download had one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from emo_stream.errors import WeightsError
from emo_stream.families.hallo.config import ARCHITECTURE, NET_PREFIXES, HalloConfig

log = logging.getLogger(__name__)

def load_net_file(path: str | Path) -> dict[str, torch.Tensor]:
    """net.pth -> flat state dict, read with weights_only=True. Missing / truncated / foreign files are one
    WeightsError line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found (expected Hallo's net.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # legacy (non-zip) format, or a broken file: the plain load says which
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, pickle with code, not a torch file: one line, as every loader
            from emo_stream.blocks.weights import unreadable_reason

            raise WeightsError(f"cannot read weights file {path}: {unreadable_reason(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: expected a flat state dict of tensors (Hallo's Net.state_dict())")
    if not any(k.startswith(tuple(p + "." for p in NET_PREFIXES)) for k in state):
        first = next(iter(state), "<empty>")
        raise WeightsError(f"{path}: not a Hallo net.pth (first key {first!r}; expected prefixes "
                           f"{', '.join(NET_PREFIXES)})")
    return state


@dataclass
class HalloDownload:
    root: Path            # pretrained_models/
    variant: str          # "hallo" | "hallo2"
    net: Path
    wav2vec2: Path | None
    vae: Path | None
    unet_config: Path | None
    face_analysis: Path | None

    def describe(self) -> str:
        title = "Hallo2" if self.variant == "hallo2" else "Hallo"
        parts = [f"{self.net.relative_to(self.root)}"]
        for name, p in (("wav2vec2", self.wav2vec2), ("vae", self.vae), ("face models", self.face_analysis)):
            parts.append(f"{name}: {'yes' if p else 'MISSING'}")
        return f"{title} download ({', '.join(parts)})"


def find_download(folder: str | Path) -> HalloDownload | None:
    """The Hallo / Hallo2 layout at `folder` (pretrained_models/ or its hallo/ / hallo2/ child), else None."""
    folder = Path(folder)
    for root in (folder, folder.parent):
        for variant in ("hallo2", "hallo"):
            net = root / variant / "net.pth"
            if net.is_file() and (root == folder or folder.name == variant):
                def opt(p: Path) -> Path | None:
                    return p if p.exists() else None
                return HalloDownload(root=root, variant=variant, net=net,
                                     wav2vec2=opt(root / "wav2vec" / "wav2vec2-base-960h"),
                                     vae=opt(root / "sd-vae-ft-mse"),
                                     unet_config=opt(root / "stable-diffusion-v1-5" / "unet" / "config.json"),
                                     face_analysis=opt(root / "face_analysis" / "models"))
    return None


def detect(folder: Path) -> str | None:
    """Family-registry hook: a one-line description of a Hallo / Hallo2 download at `folder`, else None."""
    found = find_download(folder)
    return found.describe() if found else None


def config_for_download(found: HalloDownload) -> HalloConfig:
    config = HalloConfig(variant=found.variant)
    if found.unet_config is not None:
        try:
            unet = json.loads(found.unet_config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{found.unet_config}: unreadable UNet config ({exc})") from None
        config.unet = {k: unet[k] for k in config.unet if k in unet} | {
            k: v for k, v in config.unet.items() if k not in unet}
    if found.wav2vec2 is not None and (found.wav2vec2 / "config.json").is_file():
        config.wav2vec2 = json.loads((found.wav2vec2 / "config.json").read_text())
    return config


def sizes_from_state(config: HalloConfig, state: dict[str, torch.Tensor]) -> HalloConfig:
    """Module sizes read off net.pth's shapes (face locator, projections, audio / motion modules), so a
    download whose net.pth is not SD1.5-sized (other bases, tests' shrunken sets) still builds. The UNet
    itself comes from stable-diffusion-v1-5/unet/config.json."""
    def shape(key: str) -> tuple[int, ...] | None:
        v = state.get(key)
        return tuple(v.shape) if v is not None else None

    fl_in, fl_out = shape("face_locator.conv_in.weight"), shape("face_locator.conv_out.weight")
    if fl_in and fl_out:
        chans = [fl_in[0]] + [shape(f"face_locator.blocks.{i}.weight")[0]
                              for i in range(1, 64, 2) if shape(f"face_locator.blocks.{i}.weight")]
        config.face_locator = {"conditioning_embedding_channels": fl_out[0], "conditioning_channels": fl_in[1],
                               "block_out_channels": chans}
    ip, ipn = shape("imageproj.proj.weight"), shape("imageproj.norm.weight")
    if ip and ipn:
        config.imageproj = {"cross_attention_dim": ipn[0], "clip_embeddings_dim": ip[1],
                            "clip_extra_context_tokens": ip[0] // ipn[0]}
    p1, p3, pn = shape("audioproj.proj1.weight"), shape("audioproj.proj3.weight"), shape("audioproj.norm.weight")
    if p1 and p3 and pn:
        layers = config.wav2vec2.get("num_hidden_layers", 12)
        hidden = config.wav2vec2.get("hidden_size", 768)
        config.audioproj = {"seq_len": p1[1] // (layers * hidden), "blocks": layers, "channels": hidden,
                            "intermediate_dim": p1[0], "output_dim": pn[0], "context_tokens": p3[0] // pn[0]}
    extra = dict(config.unet_additional_kwargs)
    k = next((k for k in state if k.endswith("attn2_0.to_k.weight")), None)
    if k:
        extra["audio_attention_dim"] = tuple(state[k].shape)[1]
    pe = next((k for k in state if k.endswith("pos_encoder.pe")), None)
    if pe:
        mm = dict(extra.get("motion_module_kwargs") or {})
        mm["temporal_position_encoding_max_len"] = tuple(state[pe].shape)[1]
        extra["motion_module_kwargs"] = mm
    config.unet_additional_kwargs = extra
    return config


def load_hallo(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A HalloModel from a download folder or from our converted checkpoint (eval mode, on `device`)."""
    from emo_stream.blocks.wav2vec2 import load_wav2vec2
    from emo_stream.families.hallo.model import HalloModel

    path = Path(path)
    found = find_download(path)
    if found is not None:
        log.info("loading %s", found.describe())
        config, state = read_download(found)
        wav = load_wav2vec2(found.wav2vec2)
        source = str(found.net)
    else:
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise WeightsError(f"{path}: neither a Hallo download (hallo/net.pth or hallo2/net.pth) "
                               f"nor a converted Hallo checkpoint (config.yaml)")
        data = yaml.safe_load(cfg_path.read_text()) or {}
        if data.get("architecture") != ARCHITECTURE:
            raise WeightsError(f"{cfg_path}: architecture is {data.get('architecture')!r}, not {ARCHITECTURE!r}")
        config = HalloConfig.from_dict(data)
        wav = load_wav2vec2(path / "wav2vec2")
        from safetensors.torch import load_file
        net = path / "net.safetensors"
        if not net.is_file():
            raise WeightsError(f"{net}: file not found")
        try:
            state = load_file(str(net))
        except Exception as exc:
            raise WeightsError(f"{net}: unreadable safetensors ({str(exc).splitlines()[0]})") from None
        source = str(net)
    vae_dir = found.vae if found is not None else (path / "vae" if (path / "vae").is_dir() else None)
    model = HalloModel(config, wav, vae=load_vae(vae_dir) if vae_dir is not None else None)
    model.face_models = found.face_analysis if found is not None else (
        path / "face_analysis" if (path / "face_analysis").is_dir() else None)
    model.load_net_state(state, source)
    model.eval()
    if dtype is not None:
        model.to(dtype)
        model.wav2vec2.float()      # Hallo runs wav2vec2 in fp32 and casts its features
    if device is not None:
        model.to(device)
    return model


def read_download(found: HalloDownload, config: HalloConfig | None = None) -> tuple[HalloConfig, dict]:
    """(config sized from net.pth unless given, net.pth's state dict) of a download; a download without its
    wav2vec2 folder is one WeightsError line (loading and converting both need it)."""
    if found.wav2vec2 is None:
        raise WeightsError(f"{found.root}: wav2vec/wav2vec2-base-960h is missing (download the whole "
                           f"fudan-generative-ai/{found.variant} repository)")
    state = load_net_file(found.net)
    return config or sizes_from_state(config_for_download(found), state), state


def load_vae(folder: Path):
    """diffusers AutoencoderKL folder (sd-vae-ft-mse as downloaded) -> the VAE (eval)."""
    from diffusers import AutoencoderKL
    try:
        return AutoencoderKL.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, EnvironmentError) as exc:
        raise WeightsError(f"{folder}: not a loadable diffusers VAE folder ({str(exc).splitlines()[0][:200]})") from None


def convert(folder: Path, out: Path, config: HalloConfig | None = None) -> Path:
    """Download folder -> our checkpoint folder (no pickle: safetensors + YAML + the wav2vec2 / VAE files).
    `config` overrides the published architecture (tests use shrunken weights)."""
    from safetensors.torch import save_file

    found = find_download(folder)
    if found is None:
        raise WeightsError(f"{folder}: not a Hallo / Hallo2 download (no hallo/net.pth or hallo2/net.pth)")
    config, state = read_download(found, config)
    # the loader's own key and shape check, on the meta device, before writing anything big
    from emo_stream.families.hallo.model import HalloModel
    with torch.device("meta"):
        HalloModel(config).check_net_state(state, str(found.net))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "net.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    wav_out = out / "wav2vec2"
    wav_out.mkdir(exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"):
        if (found.wav2vec2 / name).is_file():
            shutil.copy2(found.wav2vec2 / name, wav_out / name)
    if found.vae is not None:
        shutil.copytree(found.vae, out / "vae", dirs_exist_ok=True)
    if found.face_analysis is not None:   # the insightface recognition model (non-commercial licence)
        from emo_stream.families.hallo.identity import find_recognition_model
        rec = find_recognition_model(found.face_analysis)
        if rec is not None:
            (out / "face_analysis").mkdir(exist_ok=True)
            shutil.copy2(rec, out / "face_analysis" / rec.name)
    log.info("wrote %s (%s)", out, found.describe())
    return out
