"""Replay a Hallo golden set (`case.json` "model": "hallo") through our importer -> {case.tensor: max abs error}.

The folder format is ../shared/golden/hallo (see its README): weights/net.pth (+ wav2vec2-base-960h/),
masks_and_face / audio / denoiser_single / cfg_loop safetensors and audio.wav. Every reference tensor is
recomputed from the inputs the README names, never copied from another reference output, except where a
case is defined on another case's output (the denoiser takes the reference face tokens and audio tokens, so
an error there is reported once, by its own case, and not compounded).
"""

from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import numpy as np
import torch

from emo_stream.errors import WeightsError
from emo_stream.models.hallo import audio as haudio
from emo_stream.models.hallo.config import HalloConfig
from emo_stream.models.hallo.loader import load_net_file
from emo_stream.models.hallo.masks import boxes_from_mediapipe, region_masks
from emo_stream.models.hallo.model import ClipInputs, HalloModel

FILES = ("masks_and_face.safetensors", "audio.safetensors", "denoiser_single.safetensors", "cfg_loop.safetensors")


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


def _err(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a).float()
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a - b.float()).abs().max()) if a.numel() else 0.0


def read_wav_pcm16(path: Path) -> np.ndarray:
    """16-bit mono WAV -> float32 / 32768 (what librosa.load gives for such a file at its own rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != haudio.SAMPLE_RATE:
            raise _format_error()(f"{path}: expected 16 kHz mono PCM16")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return data.astype(np.float32) / 32768.0


def build_model(golden: Path, case: dict) -> HalloModel:
    config = HalloConfig.from_case(case)
    wav_dir = golden / "weights" / "wav2vec2-base-960h"
    wav2vec2 = haudio.load_wav2vec2(wav_dir) if wav_dir.is_dir() else None
    model = HalloModel(config, wav2vec2).eval()
    net = golden / "weights" / "net.pth"
    model.load_net_state(load_net_file(net), str(net))
    return model


def read_case(golden: Path) -> dict:
    case_path = golden / "case.json"
    if not case_path.is_file():
        raise _format_error()(f"{golden} is not a golden set: no case.json")
    try:
        case = json.loads(case_path.read_text())
    except json.JSONDecodeError as exc:
        raise _format_error()(f"{case_path}: not valid JSON ({exc})") from None
    if case.get("model") != "hallo":
        raise _format_error()(f"{case_path}: model is {case.get('model')!r}, not 'hallo'")
    for key in ("unet_2d_config", "unet_additional_kwargs", "module_args", "noise_scheduler_kwargs",
                "masks_and_face_case", "audio_case", "denoiser_single_case", "cfg_loop_case"):
        if key not in case:
            raise _format_error()(f"{case_path}: missing {key!r}")
    return case


@torch.no_grad()
def replay_masks(model: HalloModel, golden: Path, case: dict) -> dict[str, float]:
    errors: dict[str, float] = {}
    mf_case = case["masks_and_face_case"]
    mf = _load(golden, mf_case.get("file", FILES[0]))
    h, w = mf_case["image_hw"]
    lm = _need(mf, "landmarks_xy", "masks_and_face").numpy()
    face_box, lip_box = boxes_from_mediapipe(lm)
    if mf_case.get("given_face_box_xyxy") is not None:
        errors["masks_and_face.face_box"] = float(np.abs(np.array(face_box) -
                                                         np.array(mf_case["given_face_box_xyxy"])).max())
        errors["masks_and_face.lip_box"] = float(np.abs(np.array(lip_box) -
                                                        np.array(mf_case["given_lip_box_xyxy"])).max())
    rm = region_masks(face_box, lip_box, w, h, face_expand_ratio=model.config.face_expand_ratio)
    errors["masks_and_face.png_face_mask"] = _err(rm.face_mask.astype(np.float32), mf["png_face_mask"])
    for name, arr in (("background", rm.background), ("face", rm.face), ("lip", rm.lip)):
        errors[f"masks_and_face.png_sep_{name}"] = _err(arr.astype(np.float32), mf[f"png_sep_{name}"])
    errors["masks_and_face.face_region"] = _err(rm.face_region(), _need(mf, "face_region", "masks_and_face"))
    err = 0.0
    for k, (full, face, lip) in enumerate(rm.levels((h, w), len(model.config.unet["block_out_channels"]))):
        for name, m in (("full", full), ("face", face), ("lip", lip)):
            err = max(err, _err(m, _need(mf, f"{name}_mask_level{k}", "masks_and_face")))
    errors["masks_and_face.level_masks"] = err
    cond_tokens, uncond_tokens = model.face_tokens(_need(mf, "face_embedding", "masks_and_face"))
    errors["masks_and_face.face_tokens"] = _err(cond_tokens, _need(mf, "face_tokens", "masks_and_face"))
    errors["masks_and_face.face_tokens_uncond"] = _err(uncond_tokens,
                                                       _need(mf, "face_tokens_uncond", "masks_and_face"))
    return errors


@torch.no_grad()
def replay_audio(model: HalloModel, golden: Path, case: dict) -> dict[str, float]:
    errors: dict[str, float] = {}
    au_case = case["audio_case"]
    au = _load(golden, au_case.get("file", FILES[1]))
    clip_length = int(au_case.get("clip_length", model.config.clip_length))
    fps = int(au_case.get("fps", model.config.fps))
    wav = read_wav_pcm16(golden / "audio.wav")
    errors["audio.waveform"] = _err(wav, _need(au, "waveform", "audio"))
    normed = haudio.normalize(wav)
    errors["audio.feature_extractor_out"] = _err(normed, _need(au, "feature_extractor_out", "audio"))
    if model.wav2vec2 is None:
        raise WeightsError(f"{golden / 'weights'}: no wav2vec2-base-960h folder")
    padded, seq_len = haudio.pad_to_clips(normed, fps, clip_length)
    feats = haudio.layer_features(model.wav2vec2, padded, seq_len)
    errors["audio.wav2vec_hidden_states"] = _err(feats, _need(au, "wav2vec_hidden_states", "audio"))
    wins = haudio.windows(feats, model.config.audio_window)
    errors["audio.windows"] = _err(wins, _need(au, "windows", "audio"))
    errors["audio.audio_tokens_clip0"] = _err(model.audio_tokens(wins[:clip_length]),
                                              _need(au, "audio_tokens_clip0", "audio"))
    return errors


@torch.no_grad()
def golden_clip(model: HalloModel, golden: Path, case: dict) -> ClipInputs:
    """The clip the denoiser cases use, from the golden inputs the README names (reference face tokens,
    audio tokens and masks, so an upstream error is reported once, by its own case)."""
    mf = _load(golden, case["masks_and_face_case"].get("file", FILES[0]))
    au = _load(golden, case["audio_case"].get("file", FILES[1]))
    dn = _load(golden, case["denoiser_single_case"].get("file", FILES[2]))
    frames = int(case["denoiser_single_case"].get("clip_length", model.config.clip_length))
    n_levels = len(model.config.unet["block_out_channels"])
    return ClipInputs(ref_latents=_need(dn, "ref_latents", "denoiser_single"),
                      face_tokens=_need(mf, "face_tokens", "masks_and_face"),
                      uncond_face_tokens=_need(mf, "face_tokens_uncond", "masks_and_face"),
                      audio_tokens=_need(au, "audio_tokens_clip0", "audio"),
                      masks=[tuple(_need(mf, f"{n}_mask_level{k}", "masks_and_face") for n in ("full", "face", "lip"))
                             for k in range(n_levels)],
                      face_feature=model.face_feature(_need(mf, "face_region", "masks_and_face"), frames))


@torch.no_grad()
def replay_denoiser(model: HalloModel, golden: Path, case: dict, only_pred: bool = False) -> dict[str, float]:
    errors: dict[str, float] = {}
    dn = _load(golden, case["denoiser_single_case"].get("file", FILES[2]))
    clip = golden_clip(model, golden, case)
    errors["denoiser_single.face_locator_feature"] = _err(clip.face_feature,
                                                          _need(dn, "face_locator_feature", "denoiser_single"))
    latents = _need(dn, "latents", "denoiser_single")
    t = _need(dn, "timestep", "denoiser_single").long()
    model.prepare_reference(clip, guided=False)
    errors["denoiser_single.pred"] = _err(model.denoise(latents, t, clip, guided=False),
                                          _need(dn, "pred", "denoiser_single"))
    if only_pred:
        return errors
    saved = model.config.bank_dtype
    model.config.bank_dtype = "float32"
    try:
        model.prepare_reference(clip, guided=False)
        errors["denoiser_single.pred_bank_fp32"] = _err(model.denoise(latents, t, clip, guided=False),
                                                        _need(dn, "pred_bank_fp32", "denoiser_single"))
    finally:
        model.config.bank_dtype = saved
    model.prepare_reference(clip, guided=True)
    uncond, cond = model.denoise(latents, t, clip, guided=True).chunk(2)
    errors["denoiser_single.cfg_pred_uncond"] = _err(uncond, _need(dn, "cfg_pred_uncond", "denoiser_single"))
    errors["denoiser_single.cfg_pred_cond"] = _err(cond, _need(dn, "cfg_pred_cond", "denoiser_single"))
    return errors


@torch.no_grad()
def replay_loop(model: HalloModel, golden: Path, case: dict) -> dict[str, float]:
    errors: dict[str, float] = {}
    lp_case = case["cfg_loop_case"]
    lp = _load(golden, lp_case.get("file", FILES[3]))
    steps = int(lp_case["num_inference_steps"])
    model.scheduler.set_timesteps(steps)
    errors["cfg_loop.timesteps"] = _err(model.scheduler.timesteps.float(), _need(lp, "timesteps", "cfg_loop"))
    init = _need(lp, "initial_latents", "cfg_loop")
    seed = re.search(r"manual_seed\((\d+)\)", str(lp_case.get("generator", "")))
    if seed:   # the initial noise is torch.randn after torch.manual_seed(seed)
        noise = torch.randn(tuple(init.shape), generator=torch.Generator().manual_seed(int(seed.group(1))))
        errors["cfg_loop.initial_latents"] = _err(noise, init)
    seen: dict[str, torch.Tensor] = {}

    def record(i, _t, out, unc, con):
        seen[f"step{i}_model_output"], seen[f"step{i}_pred_uncond"], seen[f"step{i}_pred_cond"] = out, unc, con

    final = model.sample_clip(init * model.scheduler.init_noise_sigma, golden_clip(model, golden, case),
                              steps=steps, guidance=float(lp_case["guidance_scale"]), callback=record)
    for key in sorted(k for k in lp if k.startswith("step")):
        errors[f"cfg_loop.{key}"] = _err(seen.get(key, torch.empty(0)), lp[key])
    errors["cfg_loop.final_latents"] = _err(final, _need(lp, "final_latents", "cfg_loop"))
    return errors


def run_cases(golden_dir: str | Path) -> dict[str, float]:
    """{case.tensor: max abs error} for every case of a Hallo golden set."""
    golden = Path(golden_dir)
    case = read_case(golden)
    model = build_model(golden, case)
    errors: dict[str, float] = {}
    for replay in (replay_masks, replay_audio, replay_denoiser, replay_loop):
        errors.update(replay(model, golden, case))
    return errors
