"""Reading EchoMimic v1 as published (BadToBest/EchoMimic): detection, weights-set choice, strict loading.

A download folder as it comes (`huggingface-cli download BadToBest/EchoMimic ... --local-dir DIR`):

    reference_unet.pth  face_locator.pth
    denoising_unet_acc.pth + motion_module_acc.pth      the 6-step "acc" weights     (either set, or both:
    denoising_unet.pth     + motion_module.pth          the normal 30-step weights   acc is preferred)
    audio_processor/whisper_tiny.pt                     OpenAI whisper tiny (also found as whisper_tiny.pt/tiny.pt)
    sd-vae-ft-mse/                                      diffusers AutoencoderKL folder (optional here)

Every .pth is read with torch.load(weights_only=True) (never unpickling code) and checked key by key: a
missing, truncated or foreign file is one WeightsError line naming the file and the first mismatched key and
shape. Sizes come from the files' shapes (SD1.5 at full size); head counts and group norms are EchoMimic's
(8 heads, 32 groups) unless a config is given (parity passes the golden set's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from emo_stream.errors import WeightsError
from emo_stream.families.echomimic.audio import whisper_key
from emo_stream.families.echomimic.config import (EchoMimicConfig, FaceLocatorConfig, SamplingDefaults, sd15_denoiser,
                                                sd15_reference_unet)
from emo_stream.families.echomimic.keys import is_positional_table, motion_key

log = logging.getLogger(__name__)

REFERENCE = "reference_unet.pth"
FACE_LOCATOR = "face_locator.pth"
WEIGHT_SETS = {"acc": ("denoising_unet_acc.pth", "motion_module_acc.pth"),
               "normal": ("denoising_unet.pth", "motion_module.pth")}
WHISPER = ("audio_processor/whisper_tiny.pt", "whisper_tiny.pt", "audio_processor/tiny.pt", "tiny.pt")
VAE_DIR = "sd-vae-ft-mse"
# published sampling defaults per weights set (infer_audio2vid[_acc].py / configs/prompts/animation[_acc].yaml)
SAMPLING = {"acc": SamplingDefaults(steps=6, guidance=1.0), "normal": SamplingDefaults(steps=30, guidance=2.5)}


def weight_sets(folder: Path) -> list[str]:
    """The complete weights sets present in folder ("acc", "normal")."""
    return [name for name, files in WEIGHT_SETS.items() if all((folder / f).is_file() for f in files)]


def detect(folder: Path) -> str | None:
    """A one-line description if `folder` is an EchoMimic v1 download, else None (families.detect)."""
    folder = Path(folder)
    if not (folder / REFERENCE).is_file():
        return None
    if not any((folder / f).is_file() for files in WEIGHT_SETS.values() for f in files):
        return None
    sets = weight_sets(folder)
    if not sets:
        return "EchoMimic v1 download (incomplete: no complete denoising_unet*/motion_module* pair)"
    chosen = sets[0]
    files = " + ".join(WEIGHT_SETS[chosen])
    also = f"; also has {', '.join(sets[1:])}" if len(sets) > 1 else ""
    return f"EchoMimic v1 download, {chosen} weights ({files}){also}"


def choose_set(folder: Path, weights_set: str | None = None) -> str:
    sets = weight_sets(folder)
    if weights_set is not None:
        if weights_set not in WEIGHT_SETS:
            raise WeightsError(f"unknown EchoMimic weights set {weights_set!r} (acc or normal)")
        missing = [f for f in WEIGHT_SETS[weights_set] if not (folder / f).is_file()]
        if missing:
            raise WeightsError(f"{folder}: {weights_set} weights asked for, but {missing[0]} is missing")
        return weights_set
    if not sets:
        present = [f for files in WEIGHT_SETS.values() for f in files if (folder / f).is_file()]
        pairs = " or ".join(" + ".join(f) for f in WEIGHT_SETS.values())
        raise WeightsError(f"{folder}: no complete EchoMimic weights set (need {pairs}; found {present or 'none'})")
    return sets[0]


def find_whisper(folder: Path) -> Path:
    for name in WHISPER:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: whisper weights not found (expected {WHISPER[0]}, OpenAI's tiny.pt)")


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a state-dict file, one-line errors (missing, truncated, not weights)."""
    from emo_stream.blocks.weights import read_state_dict

    try:  # memory-mapped: the 3.4 GB UNet files are not copied into RAM before the model takes them
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format file, truncated, ...: the plain reader says what is wrong in one line
        state = read_state_dict(path)
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: not a state dict (got {type(state).__name__})")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None and path.suffix != ".pt":
        raise WeightsError(f"{path}: entry {bad!r} is not a tensor (not a plain state dict)")
    return state


def read_whisper(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """OpenAI checkpoint {"dims": {...}, "model_state_dict": {...}} -> (dims, encoder state in our names)."""
    ck = read_pth(path)
    if not isinstance(ck.get("dims"), dict) or not isinstance(ck.get("model_state_dict"), dict):
        raise WeightsError(f"{path}: not an OpenAI whisper checkpoint (expected keys 'dims' and "
                           f"'model_state_dict', found {sorted(ck)[:4]})")
    dims = ck["dims"]
    need = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
    missing = [k for k in need if k not in dims]
    if missing:
        raise WeightsError(f"{path}: dims lack {missing[0]}")
    state = {}
    for k, v in ck["model_state_dict"].items():
        new = whisper_key(k)
        if new is not None:
            state[new] = v
    return {k: int(dims[k]) for k in need}, state


# ---- config from shapes -----------------------------------------------------------------------------
def _count(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _shape(state: dict, key: str, source: Path) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"{source}: key {key} is missing (not an EchoMimic {source.name}?)")
    return tuple(state[key].shape)


def infer_config(denoiser: dict, motion: dict, face: dict, dims: dict, files: dict[str, Path],
                 heads: int = 8, groups: int = 32, motion_heads: int = 8) -> EchoMimicConfig:
    """EchoMimicConfig sized from the files' shapes (SD1.5 layout; heads/groups as EchoMimic's configs)."""
    den = files["denoiser"]
    levels = _count(denoiser, "down_blocks.")
    if levels == 0:
        raise WeightsError(f"{den}: no down_blocks.* keys (not an EchoMimic denoising UNet)")
    channels = [_shape(denoiser, f"down_blocks.{i}.resnets.0.conv1.weight", den)[0] for i in range(levels)]
    layers = _count(denoiser, "down_blocks.0.resnets.")
    attn2 = next((k for k in denoiser if k.endswith("attn2.to_k.weight")), None)
    if attn2 is None:
        raise WeightsError(f"{den}: no attn2 (audio cross-attention) weights, e.g. "
                           f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    audio_dim = int(denoiser[attn2].shape[1])
    pe = next((v for k, v in motion.items() if is_positional_table(k)), None)
    max_len = int(pe.shape[1]) if pe is not None else 32
    fl = files["face_locator"]
    n_blocks = _count(face, "blocks.")
    fl_channels = [_shape(face, "conv_in.weight", fl)[0]] + \
                  [_shape(face, f"blocks.{i}.weight", fl)[0] for i in range(1, n_blocks, 2)]
    cross = [f"CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.norm.weight" in denoiser else "DownBlock2D"
             for i in range(levels)]
    ref = sd15_reference_unet(channels, layers, heads, groups)
    ref["down_block_types"] = cross
    ref["up_block_types"] = [t.replace("Down", "Up") for t in reversed(cross)]
    dn = sd15_denoiser(channels, layers, heads, groups, audio_dim, motion_heads, max_len)
    dn["down_block_types"] = [t.replace("2D", "Motion") for t in cross]
    dn["up_block_types"] = [t.replace("Down", "Up").replace("2D", "Motion") for t in reversed(cross)]
    return EchoMimicConfig(reference_unet=ref, denoiser=dn, whisper=dict(dims),
                           face_locator=FaceLocatorConfig(channels=fl_channels,
                                                          out_channels=_shape(face, "conv_out.weight", fl)[0],
                                                          conditioning_channels=_shape(face, "conv_in.weight", fl)[1]))


# ---- strict loading, per file ---------------------------------------------------------------------------
def _check_part(source: Path, file_state: dict[str, torch.Tensor], names: dict[str, str],
                expected: dict[str, torch.Tensor], what: str) -> None:
    """file key -> model key `names`; the model keys this file must provide `expected` (name -> tensor).
    Raises WeightsError naming the file, the key and the shapes."""
    unknown = [fk for fk, mk in names.items() if mk not in expected]
    if unknown:   # first: a foreign file has mostly unknown keys, which says more than a shape
        fk = unknown[0]
        raise WeightsError(f"{source}: unexpected key {fk} {tuple(file_state[fk].shape)} ({len(unknown)} of "
                           f"{len(names)} keys are not EchoMimic's {what}; wrong file?)")
    for fk, mk in names.items():
        if tuple(file_state[fk].shape) != tuple(expected[mk].shape):
            raise WeightsError(f"{source}: shape mismatch for {fk}: file has {tuple(file_state[fk].shape)}, "
                               f"model expects {tuple(expected[mk].shape)} (weights for a different model size?)")
    have = set(names.values())
    missing = [k for k in expected if k not in have]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} keys missing, e.g. {missing[0]} "
                           f"{tuple(expected[missing[0]].shape)} (truncated or wrong file?)")


def map_weights(model_state: dict[str, torch.Tensor], parts: dict[str, dict[str, torch.Tensor]],
                files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The published files' tensors under our model's state-dict names, each file checked strictly against the
    part of the model it fills. model_state: the model's state_dict() (meta tensors are fine)."""
    out: dict[str, torch.Tensor] = {}

    def part(prefix: str, only=None) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in model_state.items()
                if k.startswith(prefix) and (only is None or only(k))}

    # reference_unet.pth: identical names
    ref = part("reference_unet.")
    _check_part(files["reference"], parts["reference"], {k: k for k in parts["reference"]}, ref, "ReferenceNet")
    out.update({f"reference_unet.{k}": v for k, v in parts["reference"].items()})
    # denoising_unet.pth: every denoiser key but the temporal modules'
    den = part("denoiser.", lambda k: ".motion_modules." not in k)
    _check_part(files["denoiser"], parts["denoiser"], {k: k for k in parts["denoiser"]}, den, "denoising UNet")
    out.update({f"denoiser.{k}": v for k, v in parts["denoiser"].items()})
    # motion_module.pth: renamed; the sinusoid tables are recomputed (checked equal when the file has them)
    mm = part("denoiser.", lambda k: ".motion_modules." in k)
    names = {k: motion_key(k) for k in parts["motion"]}
    tables = {k for k in mm if is_positional_table(k)}
    _check_part(files["motion"], parts["motion"], names, mm, "temporal modules")
    for fk, mk in names.items():
        v = parts["motion"][fk]
        if mk in tables:
            ref_table = mm[mk]
            if not (ref_table.is_meta or v.is_meta) and not torch.allclose(v.float(), ref_table.float(), atol=1e-5):
                raise WeightsError(f"{files['motion']}: {fk} is not the sinusoidal position table the temporal "
                                   f"attention expects (max diff {(v.float() - ref_table.float()).abs().max():.3g})")
            continue
        out[f"denoiser.{mk}"] = v
    for mk in tables:
        out[f"denoiser.{mk}"] = mm[mk]
    # face_locator.pth: identical names
    fl = part("face_locator.")
    _check_part(files["face_locator"], parts["face_locator"], {k: k for k in parts["face_locator"]}, fl,
                "face locator")
    out.update({f"face_locator.{k}": v for k, v in parts["face_locator"].items()})
    # whisper: encoder only, renamed
    wh = part("whisper.encoder.")
    _check_part(files["whisper"], parts["whisper"], {k: k for k in parts["whisper"]}, wh, "whisper encoder")
    out.update({f"whisper.encoder.{k}": v for k, v in parts["whisper"].items()})
    return out


def read_parts(folder: Path, weights_set: str | None = None) -> tuple[str, dict[str, Path], dict, dict]:
    """(weights set, files, parts' state dicts, whisper dims) of a download folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"EchoMimic folder not found: {folder}")
    chosen = choose_set(folder, weights_set)
    den, mot = WEIGHT_SETS[chosen]
    files = {"reference": folder / REFERENCE, "denoiser": folder / den, "motion": folder / mot,
             "face_locator": folder / FACE_LOCATOR, "whisper": find_whisper(folder)}
    for what, path in files.items():
        if not path.is_file():
            raise WeightsError(f"{folder}: {path.name} is missing")
    parts = {k: read_pth(files[k]) for k in ("reference", "denoiser", "motion", "face_locator")}
    dims, parts["whisper"] = read_whisper(files["whisper"])
    return chosen, files, parts, dims


def load_vae(folder: Path):
    """sd-vae-ft-mse/ (diffusers folder) -> (AutoencoderKL, its constructor kwargs), or (None, None)."""
    vae_dir = folder / VAE_DIR
    if not vae_dir.is_dir():
        return None, None
    from diffusers import AutoencoderKL

    from emo_stream.blocks.weights import find_weights, load_checked, read_state_dict

    cfg_path = vae_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{cfg_path}: cannot read the VAE config ({exc})") from None
    import inspect

    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if k in allowed}
    vae = AutoencoderKL(**kwargs)
    path = find_weights(vae_dir, "VAE")
    state = read_state_dict(path)
    from emo_stream.blocks.weights import modernise_vae_keys

    load_checked(vae, modernise_vae_keys(state), path)
    return vae, kwargs


def load_download(folder: str | Path, config: EchoMimicConfig | None = None, weights_set: str | None = None,
                  device=None, dtype=None, with_vae: bool = True):
    """An EchoMimic v1 download folder -> EchoMimicModel (exactly EchoMimic's numbers in fp32).

    config None: sized from the files (see infer_config); the weights set's published sampling defaults."""
    from emo_stream.families.echomimic.model import EchoMimicModel
    from emo_stream.blocks.weights import empty_weights

    folder = Path(folder)
    chosen, files, parts, dims = read_parts(folder, weights_set)
    if config is None:
        config = infer_config(parts["denoiser"], parts["motion"], parts["face_locator"], dims, files)
        config.sampling = SAMPLING[chosen]
    elif dict(config.whisper) != dict(dims, **{k: v for k, v in config.whisper.items() if k not in dims}):
        raise WeightsError(f"{files['whisper']}: dims {dims} differ from the config's whisper {config.whisper}")
    config.weights_set = chosen
    vae, vae_kwargs = load_vae(folder) if with_vae else (None, None)
    config.vae = vae_kwargs
    config.validate()
    log.info("EchoMimic v1: %s weights (%s, %s)", chosen, files["denoiser"].name, files["motion"].name)
    with empty_weights():
        model = EchoMimicModel._build(_without_vae(config))
    own = model.state_dict()
    # assign=True keeps a tensor's dtype: bring every file's tensors (whisper's are fp16) to the model's fp32
    state = {k: v.to(own[k].dtype) for k, v in map_weights(own, parts, files).items()}
    missing = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in missing.missing_keys]
    if left:
        raise WeightsError(f"{folder}: no weights for {left[0]}")
    if vae is not None:
        model.vae = vae.eval().requires_grad_(False)
    model.config = config
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _without_vae(config: EchoMimicConfig) -> EchoMimicConfig:
    from dataclasses import replace

    return replace(config, vae=None)


def load(path: str | Path, device=None, dtype=None, weights_set: str | None = None, **_):
    """families entry point: our echomimic-v1 checkpoint, or a download folder."""
    from emo_stream.families.echomimic.model import CONFIG_FILE, EchoMimicModel

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        model = EchoMimicModel.from_pretrained(path, device=device, dtype=dtype)
        if weights_set is not None and weights_set != model.config.weights_set:
            # a converted checkpoint holds one set: asking for the other must not pass silently
            raise WeightsError(f"{path}: {weights_set} weights asked for, but this checkpoint holds the "
                               f"{model.config.weights_set} set (convert the download with "
                               f"--weights-set {weights_set})")
        return model
    return load_download(path, weights_set=weights_set, device=device, dtype=dtype)


def convert(folder: Path, out: Path, weights_set: str | None = None) -> Path:
    """families entry point: download folder -> our checkpoint (config.yaml + model.safetensors)."""
    model = load_download(folder, weights_set=weights_set)
    return model.save_pretrained(out)
