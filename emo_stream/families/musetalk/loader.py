"""MuseTalk 1.5 weights: the download folder as it comes, and our converted checkpoint.

Download layout (MuseTalk's download_weights.sh; see docs/musetalk.md), `--model` naming `models/` itself or
the folder holding it (MuseTalk's checkout):

    models/
      musetalkV15/musetalk.json, unet.pth          the UNet (diffusers config + torch.save'd state dict)
      sd-vae/config.json, diffusion_pytorch_model.{bin,safetensors}    stabilityai/sd-vae-ft-mse
      whisper/config.json, pytorch_model.bin (or model.safetensors), preprocessor_config.json    openai/whisper-tiny
      face-parse-bisent/79999_iter.pth             the face-parsing BiSeNet (its resnet18-5c106cde.pth, the
                                                   ImageNet backbone it starts from, is not needed: 79999_iter.pth
                                                   holds every backbone value)

DWPose, the SyncNet and MuseTalk v1's musetalk/ folder may be there too; they are not read.

Our checkpoint (`emo-stream convert`): config.yaml (architecture: musetalk, every network's config) +
unet.safetensors, vae.safetensors, whisper_encoder.safetensors, face_parsing.safetensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from emo_stream import config_io
from emo_stream.errors import WeightsError
from emo_stream.families.musetalk.config import ARCHITECTURE, MuseTalkConfig

log = logging.getLogger(__name__)

UNET_DIR, VAE_DIR, WHISPER_DIR, PARSING_DIR = "musetalkV15", "sd-vae", "whisper", "face-parse-bisent"
PARSING_FILE = "79999_iter.pth"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_FILES = ("unet.safetensors", "vae.safetensors", "whisper_encoder.safetensors", "face_parsing.safetensors")


@dataclass
class MuseTalkDownload:
    root: Path   # the folder holding musetalkV15/, sd-vae/, whisper/, face-parse-bisent/

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def describe(self) -> str:
        parts = []
        for name, p in (("vae", self.path(VAE_DIR)), ("whisper", self.path(WHISPER_DIR)),
                        ("face parsing", self.path(PARSING_DIR, PARSING_FILE))):
            parts.append(f"{name}: {'yes' if p.exists() else 'MISSING'}")
        return f"MuseTalk 1.5 download ({UNET_DIR}/unet.pth, {', '.join(parts)})"

    def first_file(self, folder: str, names: tuple[str, ...]) -> Path:
        for name in names:
            if self.path(folder, name).is_file():
                return self.path(folder, name)
        raise WeightsError(f"{self.path(folder, names[-1])}: file not found (MuseTalk's download has it; "
                           f"see docs/musetalk.md)")

    def need(self, *parts: str) -> Path:
        p = self.path(*parts)
        if not p.is_file():
            raise WeightsError(f"{p}: file not found (MuseTalk's download has it; see docs/musetalk.md)")
        return p


def find_download(folder: str | Path) -> MuseTalkDownload | None:
    """MuseTalk's models/ layout at `folder` or at `folder`/models, else None."""
    folder = Path(folder)
    for root in (folder, folder / "models"):
        if (root / UNET_DIR).is_dir():
            return MuseTalkDownload(root)
    return None


def detect(folder: Path) -> str | None:
    """Family-registry hook: one line describing a MuseTalk download at `folder`, else None."""
    found = find_download(folder)
    return found.describe() if found else None


# ---- reading files -------------------------------------------------------------------------------------------
def _unreadable(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, EOFError) or "central directory" in first or "incomplete metadata" in first:
        return "truncated or corrupt (incomplete download? fetch the file again)"
    if "Unsupported global" in str(exc) or "weights_only" in str(exc):
        return "it holds pickled Python objects besides tensors; refused (read with weights_only=True)"
    if type(exc).__name__ in ("UnpicklingError", "KeyError", "RuntimeError"):
        return "not a torch weights file"
    return f"{type(exc).__name__}: {first.split('. ')[0][:200]}"


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .pth/.bin (weights_only) or .safetensors file; one WeightsError line otherwise."""
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a weights file: one line naming the file
        raise WeightsError(f"cannot read weights file {path}: {_unreadable(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: expected a flat state dict of tensors")
    return state


def read_json(path: Path) -> dict:
    return config_io.read_json(path, WeightsError,
                               f"{path}: file not found (MuseTalk's download has it; see docs/musetalk.md)")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str, what: str) -> None:
    """Copy `state` into `module` exactly (every key, every shape) or raise one WeightsError line naming the file
    and the first mismatching key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        if bad:
            k = bad[0]
            detail = f"{k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
        else:
            k = (missing or extra)[0]
            detail = f"{'missing' if missing else 'unexpected'} key {k}"
        raise WeightsError(f"{source}: not {what} for this config ({detail})")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def whisper_encoder_state(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The encoder's keys of a WhisperModel ("encoder.*") or WhisperForConditionalGeneration ("model.encoder.*")."""
    out = {}
    for k, v in state.items():
        k = k[len("model."):] if k.startswith("model.") else k
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
    if not out:
        raise WeightsError(f"{source}: not a whisper model (no encoder.* keys; first key {next(iter(state), '<none>')!r})")
    return out


# ---- building the networks ---------------------------------------------------------------------------------
def build_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_config(cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise WeightsError(f"musetalk.json: not a UNet2DConditionModel config ({exc})") from None


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(cfg)


def build_whisper_encoder(cfg: dict):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    return WhisperEncoder(config)


def build_extractor(cfg: dict):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(**{k: v for k, v in cfg.items() if k != "feature_extractor_type"})


def build_networks(config: MuseTalkConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """A MuseTalkModel of `config`'s shapes without loading anything (no face-parsing net): initialised on
    `device` (random weights there; "meta": structure only, for counting memory and FLOPs)."""
    from emo_stream.families.musetalk.model import MuseTalkModel

    dev = torch.device(device)
    with dev:
        unet, vae, encoder = build_unet(config.unet), build_vae(config.vae), build_whisper_encoder(config.whisper)
    model = MuseTalkModel(config, unet, vae, encoder, build_extractor(config.feature_extractor), None)
    return model.eval().requires_grad_(False).to_runtime(dev, dtype)


def _check_configs(config: MuseTalkConfig, source: Path) -> None:
    d = config.whisper.get("d_model")
    cross = config.unet.get("cross_attention_dim")
    if d is not None and cross is not None and int(d) != int(cross):
        raise WeightsError(f"{source}: the UNet's cross_attention_dim {cross} is not the whisper width {d}")
    if int(config.unet.get("in_channels", 8)) != 2 * int(config.vae.get("latent_channels", 4)):
        raise WeightsError(f"{source}: the UNet takes {config.unet.get('in_channels')} channels, not masked + "
                           f"reference latents (2 x {config.vae.get('latent_channels', 4)})")


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         face_parsing: bool = True):
    """A MuseTalkModel (eval) from a download folder or our checkpoint. dtype applies to the UNet, VAE and
    whisper (fp16 / bf16 on CUDA); the face-parsing net stays float32. face_parsing=False skips it (the live
    path only needs it when preparing avatars)."""
    from emo_stream.families.musetalk.face_parsing import FaceParser, MaskRule, load_bisenet
    from emo_stream.families.musetalk.model import MuseTalkModel

    path = Path(path)
    found = find_download(path)
    if found is not None:
        log.info("loading %s", found.describe())
        unet_json = found.path(UNET_DIR, "musetalk.json")
        config = MuseTalkConfig(unet=read_json(unet_json), vae=read_json(found.path(VAE_DIR, "config.json")),
                                whisper=read_json(found.path(WHISPER_DIR, "config.json")),
                                feature_extractor=read_json(found.path(WHISPER_DIR, "preprocessor_config.json")))
        _check_configs(config, unet_json)
        sources = {"unet": found.need(UNET_DIR, "unet.pth"), "vae": found.first_file(VAE_DIR, WEIGHT_NAMES),
                   "whisper": found.first_file(WHISPER_DIR, WHISPER_WEIGHTS),
                   "parsing": found.need(PARSING_DIR, PARSING_FILE) if face_parsing else None}
        whisper_state = lambda: whisper_encoder_state(read_state(sources["whisper"]), sources["whisper"])  # noqa: E731
    else:
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise WeightsError(f"{path}: neither a MuseTalk download ({UNET_DIR}/, {VAE_DIR}/, {WHISPER_DIR}/, "
                               f"{PARSING_DIR}/) nor a converted MuseTalk checkpoint (config.yaml)")
        try:
            data = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise WeightsError(f"{cfg_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("architecture") != ARCHITECTURE:
            raise WeightsError(f"{cfg_path}: architecture is {data.get('architecture') if isinstance(data, dict) else None!r}, "
                               f"not {ARCHITECTURE!r}")
        config = MuseTalkConfig.from_dict(data)
        _check_configs(config, cfg_path)
        sources = {"unet": path / "unet.safetensors", "vae": path / "vae.safetensors",
                   "whisper": path / "whisper_encoder.safetensors",
                   "parsing": path / "face_parsing.safetensors" if face_parsing else None}
        whisper_state = lambda: read_state(sources["whisper"])  # noqa: E731

    unet = build_unet(config.unet)
    load_strict(unet, read_state(sources["unet"]), sources["unet"], "MuseTalk's UNet")
    if found is not None:
        vae = _vae_from_download(found.path(VAE_DIR), sources["vae"], config.vae)
    else:
        vae = build_vae(config.vae)
        load_strict(vae, read_state(sources["vae"]), sources["vae"], "an SD VAE")
    encoder = build_whisper_encoder(config.whisper)
    load_strict(encoder, whisper_state(), sources["whisper"], "a whisper encoder")
    extractor = build_extractor(config.feature_extractor)
    parser = None
    if sources["parsing"] is not None:
        try:
            net = load_bisenet(read_state(sources["parsing"]))
        except ValueError as exc:
            raise WeightsError(f"{sources['parsing']}: {exc}") from None
        parser = FaceParser(net, MaskRule(config.left_cheek_width, config.right_cheek_width))
    model = MuseTalkModel(config, unet, vae, encoder, extractor, parser).eval()
    if device is not None or dtype is not None:
        model.to_runtime(device, dtype)
    return model


OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def vae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-vae-ft-mse's .bin predates diffusers' attention names (query/key/value/proj_attn): rename them."""
    out = {}
    for k, v in state.items():
        if ".attentions." in k:
            for a, b in OLD_ATTENTION.items():
                k = k.replace(a, b)
            if v.ndim == 4 and k.endswith("weight") and v.shape[2:] == (1, 1):   # 1x1 conv form -> linear
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def _vae_from_download(folder: Path, weights: Path, cfg: dict):
    """sd-vae/ as published (read with weights_only, never unpickled as code)."""
    vae = build_vae(cfg)
    load_strict(vae, vae_state(read_state(weights)), weights, "an SD VAE")
    return vae.eval()


def convert(folder: Path, out: Path) -> Path:
    """Download folder -> our checkpoint (config.yaml + safetensors, no pickle), checked to load first."""
    from safetensors.torch import save_file

    found = find_download(folder)
    if found is None:
        raise WeightsError(f"{folder}: not a MuseTalk download (no {UNET_DIR}/ here or under models/)")
    model = load(folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"unet.safetensors": model.unet, "vae.safetensors": model.vae,
             "whisper_encoder.safetensors": model.whisper, "face_parsing.safetensors": model.parser.net}
    for name, module in parts.items():
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out / name))
    config = model.config.to_dict()
    config["vae"] = {k: v for k, v in dict(model.vae.config).items()}
    (out / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    log.info("wrote %s (%s)", out, found.describe())
    return out


def _plain(x):
    """YAML-safe copy (diffusers configs hold tuples and FrozenDicts)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
