"""Replay a Hallo golden set (`case.json` "model": "hallo") through our importer -> {case.tensor: max abs error}.

The folder format is ../shared/golden/hallo (see its README): weights/net.pth (+ wav2vec2-base-960h/),
masks_and_face / audio / denoiser_single / cfg_loop safetensors and audio.wav. Every reference tensor is
recomputed from the inputs the README names, never copied from another reference output, except where a
case is defined on another case's output (the denoiser takes the reference face tokens and audio tokens, so
an error there is reported once, by its own case, and not compounded).

Nothing is tied to the dev set: sizes come from case.json's configs and the weight files, file names from each
case's "file" / "wav", clip length, motion frames, motion scale, timestep, steps, guidance and seeds from the
case sections. Every case section is optional (a set without e.g. cfg_loop_case simply does not report it); an
output tensor is compared when its file holds it, and one that the section's "tensors" lists but the file
lacks is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emo_stream.config_io import read_json
from emo_stream.errors import ConfigError, WeightsError
from emo_stream.blocks.wav2vec2 import load_wav2vec2
from emo_stream.families.hallo import audio as haudio
from emo_stream.families.hallo.config import HalloConfig
from emo_stream.families.hallo.loader import load_net_file
from emo_stream.families.hallo.masks import boxes_from_mediapipe, region_masks
from emo_stream.families.hallo.model import ClipInputs, HalloModel

# case group (the prefix of its error names, and --case NAME) -> its case.json section
GROUPS = {"masks_and_face": "masks_and_face_case", "audio": "audio_case", "denoiser_single": "denoiser_single_case",
          "cfg_loop": "cfg_loop_case"}


def _format_error():
    from emo_stream.parity import GoldenFormatError   # owned by the dispatcher (imports nothing heavy)
    return GoldenFormatError


def _load(golden: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = golden / name
    if not path.is_file():
        raise _format_error()(f"{golden}: missing {name}")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise _format_error()(f"{path}: unreadable safetensors ({str(exc).splitlines()[0]})") from None


def _need(tensors: dict[str, torch.Tensor], key: str, file: str) -> torch.Tensor:
    if key not in tensors:
        raise _format_error()(f"{file}: missing tensor {key!r}")
    return tensors[key].float()


def _compare(errors: dict[str, float], name: str, ours, tensors: dict[str, torch.Tensor], key: str,
             section: dict, file: str) -> None:
    """errors[name] = max abs error of `ours` vs tensors[key] when the file holds it; a tensor the section's
    "tensors" lists but the file lacks is an error, one that is neither listed nor stored is not reported."""
    if key in tensors:
        errors[name] = _err(ours() if callable(ours) else ours, tensors[key])
    elif key in listed_tensors(section):
        raise _format_error()(f"{file}: tensor {key!r} is listed in case.json but missing")


def listed_tensors(section: dict) -> set[str]:
    """The tensor names a case section promises: its "tensors" and "outputs" keys ("a / b" names two)."""
    names = set(section.get("tensors") or {})
    return names | {part.strip() for key in (section.get("outputs") or {}) for part in str(key).split("/")}


def _section(case: dict, group: str) -> dict:
    return case.get(GROUPS[group]) or {}


def _file_name(case: dict, group: str) -> str:
    return _section(case, group).get("file", f"{group}.safetensors")


@dataclass
class _CaseFile:
    """One case group's section, file and tensors, and the errors its replay reports as "group.name"."""

    group: str
    section: dict
    name: str
    tensors: dict[str, torch.Tensor]
    errors: dict[str, float] = field(default_factory=dict)

    def cmp(self, err_name: str, ours, key: str | None = None) -> None:
        _compare(self.errors, f"{self.group}.{err_name}", ours, self.tensors, key or err_name, self.section,
                 self.name)


def _open(golden: Path, case: dict, group: str) -> _CaseFile:
    name = _file_name(case, group)
    return _CaseFile(group, _section(case, group), name, _load(golden, name))


def _err(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).float()
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a - b.float()).abs().max()) if a.numel() else 0.0


def read_wav_pcm16(path: Path) -> np.ndarray:
    """16-bit mono WAV -> float32 / 32768 (what librosa.load gives for such a file at its own rate)."""
    from emo_stream.pcm import read_wav16

    if not Path(path).is_file():
        raise _format_error()(f"{path} is missing")
    return read_wav16(path, _format_error())


def wav_path(golden: Path, case: dict) -> Path:
    """The audio case's wav: case.json audio_case "wav" is "NAME (description)"."""
    return golden / str(_section(case, "audio").get("wav", "audio.wav")).split()[0]


def _unsupported(case: dict) -> str | None:
    """The first unet_additional_kwargs setting our Hallo model does not implement (None: all supported)."""
    add = case["unet_additional_kwargs"]
    levels = len(case["unet_2d_config"].get("block_out_channels", [0] * 4))
    checks = {
        "per-frame (inflated) group norm": add.get("use_inflated_groupnorm", True),
        "no cross-frame or extra temporal attention in the spatial blocks":
            not add.get("unet_use_cross_frame_attention") and not add.get("unet_use_temporal_attention"),
        "motion modules in the encoder too (not decoder-only)": not add.get("motion_module_decoder_only", False),
        "Vanilla motion modules": add.get("motion_module_type", "Vanilla") == "Vanilla",
        "audio modules in every up/down/mid block": not add.get("use_audio_module", True) or (
            set(add.get("stack_enable_blocks_name", ["up", "down", "mid"])) == {"up", "down", "mid"}
            and set(add.get("stack_enable_blocks_depth", range(levels))) >= set(range(levels))),
    }
    return next((name for name, ok in checks.items() if not ok), None)


def build_model(golden: Path, case: dict) -> HalloModel:
    bad = _unsupported(case)
    if bad:
        raise _format_error()(f"{golden / 'case.json'}: unsupported Hallo variant (this model implements {bad})")
    try:
        config = HalloConfig.from_case(case)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise _format_error()(f"{golden / 'case.json'}: unusable Hallo config ({exc})") from None
    weights = golden / "weights"
    if not weights.is_dir():
        raise _format_error()(f"{golden}: no weights/ folder")
    wav_dir = weights / "wav2vec2-base-960h"
    wav2vec2 = load_wav2vec2(wav_dir) if wav_dir.is_dir() else None
    try:
        model = HalloModel(config, wav2vec2).eval()
    except (KeyError, TypeError, ValueError) as exc:
        raise _format_error()(f"{golden / 'case.json'}: unsupported Hallo variant ({exc})") from None
    net = weights / "net.pth"
    model.load_net_state(load_net_file(net), str(net))
    return model


def read_case(golden: Path) -> dict:
    case_path = golden / "case.json"
    case = read_json(case_path, _format_error(), f"{golden} is not a golden set: no case.json")
    if case.get("model") != "hallo":
        raise _format_error()(f"{case_path}: model is {case.get('model')!r}, not 'hallo'")
    for key in ("unet_2d_config", "unet_additional_kwargs", "module_args", "noise_scheduler_kwargs"):
        if key not in case:
            raise _format_error()(f"{case_path}: missing {key!r}")
    for key in ("face_locator", "imageproj", "audioproj"):
        if key not in case["module_args"]:
            raise _format_error()(f"{case_path}: module_args lacks {key!r}")
    if not any(case.get(section) for section in GROUPS.values()):
        raise _format_error()(f"{case_path}: lists no case ({', '.join(GROUPS.values())})")
    return case


@torch.no_grad()
def replay_masks(model: HalloModel, golden: Path, case: dict) -> dict[str, float]:
    cf = _open(golden, case, "masks_and_face")
    mf_case, name, mf, errors, cmp = cf.section, cf.name, cf.tensors, cf.errors, cf.cmp
    if "image_hw" in mf_case:
        h, w = mf_case["image_hw"]
    else:
        h = w = model.config.image_size
    lm = _need(mf, "landmarks_xy", name).numpy()
    face_box, lip_box = boxes_from_mediapipe(lm)
    for key, box in (("given_face_box_xyxy", face_box), ("given_lip_box_xyxy", lip_box)):
        if mf_case.get(key) is not None:
            errors[f"masks_and_face.{key.split('_')[1]}_box"] = float(np.abs(np.array(box) -
                                                                             np.array(mf_case[key])).max())
    rm = region_masks(face_box, lip_box, w, h, face_expand_ratio=face_expand_ratio(case, model.config))
    cmp("png_face_mask", rm.face_mask.astype(np.float32), "png_face_mask")
    for part, arr in (("background", rm.background), ("face", rm.face), ("lip", rm.lip)):
        cmp(f"png_sep_{part}", arr.astype(np.float32), f"png_sep_{part}")
    cmp("face_region", rm.face_region, "face_region")
    err, seen = 0.0, False
    for k, (full, face, lip) in enumerate(rm.levels((h, w), len(model.config.unet["block_out_channels"]))):
        for part, m in (("full", full), ("face", face), ("lip", lip)):
            key = f"{part}_mask_level{k}"
            if key in mf:
                err, seen = max(err, _err(m, mf[key])), True
            elif key in listed_tensors(mf_case):
                raise _format_error()(f"{name}: tensor {key!r} is listed in case.json but missing")
    if seen:
        errors["masks_and_face.level_masks"] = err
    if "face_embedding" in mf:
        cond_tokens, uncond_tokens = model.face_tokens(mf["face_embedding"].float())
        cmp("face_tokens", cond_tokens, "face_tokens")
        cmp("face_tokens_uncond", uncond_tokens, "face_tokens_uncond")
    return errors


def face_expand_ratio(case: dict, config: HalloConfig) -> float:
    """The face box's expand ratio: masks_and_face_case "face_expand_ratio", else the number its rules name
    ("... face_expand_ratio 1.2 ..."), else the config's (Hallo's default 1.2)."""
    mf_case = _section(case, "masks_and_face")
    if "face_expand_ratio" in mf_case:
        return float(mf_case["face_expand_ratio"])
    for rule in mf_case.get("rules", []):
        found = re.search(r"face_expand_ratio\D{0,3}?(\d+(?:\.\d+)?)", str(rule))
        if found:
            return float(found.group(1))
    return config.face_expand_ratio


@torch.no_grad()
def replay_audio(model: HalloModel, golden: Path, case: dict) -> dict[str, float]:
    cf = _open(golden, case, "audio")
    au_case, au, errors, cmp = cf.section, cf.tensors, cf.errors, cf.cmp
    clip_length = int(au_case.get("clip_length", model.config.clip_length))
    fps = int(au_case.get("fps", model.config.fps))
    wav = read_wav_pcm16(wav_path(golden, case))
    cmp("waveform", wav)
    normed = haudio.normalize(wav)
    cmp("feature_extractor_out", normed)
    if model.wav2vec2 is None:
        raise WeightsError(f"{golden / 'weights'}: no wav2vec2-base-960h folder")
    padded, seq_len = haudio.pad_to_clips(normed, fps, clip_length)
    feats = haudio.layer_features(model.wav2vec2, padded, seq_len)
    cmp("wav2vec_hidden_states", feats)
    wins = haudio.windows(feats, model.config.audio_window)
    cmp("windows", wins)
    for c in range(seq_len // clip_length):   # audio_tokens_clip0, and any later clip the file holds
        key = f"audio_tokens_clip{c}"
        if key in au or key in listed_tensors(au_case):
            cmp(key, lambda c=c: model.audio_tokens(wins[c * clip_length:(c + 1) * clip_length]))
    return errors


@torch.no_grad()
def golden_clip(model: HalloModel, golden: Path, case: dict) -> ClipInputs:
    """The clip the denoiser cases use, from the golden inputs the README names (reference face tokens,
    audio tokens and masks, so an upstream error is reported once, by its own case)."""
    mf_name, au_name = _file_name(case, "masks_and_face"), _file_name(case, "audio")
    mf, au = _load(golden, mf_name), _load(golden, au_name)
    # a set with a loop but no single call: the loop's file carries its reference latents
    ref_name = _file_name(case, "denoiser_single" if _section(case, "denoiser_single") else "cfg_loop")
    ref = _need(_load(golden, ref_name), "ref_latents", ref_name)
    audio_tokens = _need(au, "audio_tokens_clip0", au_name)
    frames = audio_tokens.shape[1]
    n_levels = len(model.config.unet["block_out_channels"])
    return ClipInputs(ref_latents=ref,
                      face_tokens=_need(mf, "face_tokens", mf_name),
                      uncond_face_tokens=_need(mf, "face_tokens_uncond", mf_name),
                      audio_tokens=audio_tokens,
                      masks=[tuple(_need(mf, f"{n}_mask_level{k}", mf_name) for n in ("full", "face", "lip"))
                             for k in range(n_levels)],
                      face_feature=model.face_feature(_need(mf, "face_region", mf_name), frames))


@torch.no_grad()
def replay_denoiser(model: HalloModel, golden: Path, case: dict, only_pred: bool = False) -> dict[str, float]:
    cf = _open(golden, case, "denoiser_single")
    dn_case, name, dn, errors, cmp = cf.section, cf.name, cf.tensors, cf.errors, cf.cmp
    clip = golden_clip(model, golden, case)
    cmp("face_locator_feature", clip.face_feature)
    latents = _need(dn, "latents", name)
    if "timestep" in dn:
        t = dn["timestep"].long()
    elif "timestep" in dn_case:
        t = torch.tensor([int(dn_case["timestep"])])
    else:
        raise _format_error()(f"{name}: no 'timestep' tensor and case.json denoiser_single_case has no timestep")
    model.prepare_reference(clip, guided=False)
    cmp("pred", lambda: model.denoise(latents, t, clip, guided=False))
    if only_pred:
        return errors
    if "pred_bank_fp32" in dn or "pred_bank_fp32" in listed_tensors(dn_case):
        saved = model.config.bank_dtype
        model.config.bank_dtype = "float32"
        try:
            model.prepare_reference(clip, guided=False)
            cmp("pred_bank_fp32", lambda: model.denoise(latents, t, clip, guided=False))
        finally:
            model.config.bank_dtype = saved
    if any(k in dn or k in listed_tensors(dn_case) for k in ("cfg_pred_uncond", "cfg_pred_cond")):
        model.prepare_reference(clip, guided=True)
        uncond, cond = model.denoise(latents, t, clip, guided=True).chunk(2)
        cmp("cfg_pred_uncond", uncond)
        cmp("cfg_pred_cond", cond)
    return errors


@torch.no_grad()
def replay_loop(model: HalloModel, golden: Path, case: dict) -> dict[str, float]:
    cf = _open(golden, case, "cfg_loop")
    lp_case, name, lp, errors = cf.section, cf.name, cf.tensors, cf.errors
    for key in ("num_inference_steps", "guidance_scale"):
        if key not in lp_case:
            raise _format_error()(f"case.json cfg_loop_case: missing {key!r}")
    if float(lp_case.get("eta", 0.0)) != 0.0:
        raise _format_error()("case.json cfg_loop_case: only eta 0 (Hallo's DDIM setting) is replayed")
    steps = int(lp_case["num_inference_steps"])
    model.scheduler.set_timesteps(steps)
    cf.cmp("timesteps", model.scheduler.timesteps.float())
    init = _need(lp, "initial_latents", name)
    seed = re.search(r"manual_seed\((\d+)\)", str(lp_case.get("generator", "")))
    if seed:   # the initial noise is torch.randn after torch.manual_seed(seed)
        noise = torch.randn(tuple(init.shape), generator=torch.Generator().manual_seed(int(seed.group(1))))
        errors["cfg_loop.initial_latents"] = _err(noise, init)
    seen: dict[str, torch.Tensor] = {}

    def record(i, _t, out, unc, con):
        seen[f"step{i}_model_output"], seen[f"step{i}_pred_uncond"], seen[f"step{i}_pred_cond"] = out, unc, con

    final = model.sample_clip(init * model.scheduler.init_noise_sigma, golden_clip(model, golden, case),
                              steps=steps, guidance=float(lp_case["guidance_scale"]), callback=record)
    listed = listed_tensors(lp_case) | set(lp)
    for key in sorted(k for k in listed if re.fullmatch(r"step\d+_(model_output|pred_uncond|pred_cond)", k)):
        if key not in lp:
            raise _format_error()(f"{name}: tensor {key!r} is listed in case.json but missing")
        errors[f"cfg_loop.{key}"] = _err(seen[key] if seen.get(key) is not None else torch.empty(0), lp[key])
    cf.cmp("final_latents", final)
    return errors


REPLAYS = {"masks_and_face": replay_masks, "audio": replay_audio, "denoiser_single": replay_denoiser,
           "cfg_loop": replay_loop}


def run_cases(golden_dir: str | Path, only: set[str] | None = None) -> dict[str, float]:
    """{case.tensor: max abs error} for every case a Hallo golden set lists (only: these case groups)."""
    golden = Path(golden_dir)
    case = read_case(golden)
    if only is not None:
        unknown = sorted(set(only) - set(REPLAYS))
        if unknown:
            raise _format_error()(f"unknown case {unknown[0]!r} (known: {', '.join(REPLAYS)})")
    model = build_model(golden, case)
    errors: dict[str, float] = {}
    for group, replay in REPLAYS.items():
        if _section(case, group) and (only is None or group in only):
            errors.update(replay(model, golden, case))
    return errors
