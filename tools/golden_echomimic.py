"""Make EchoMimic v1 golden sets (the folder format of ../shared/golden/echomimic-v1) by running EchoMimic's code.

EchoMimic is imported from a local checkout (github antgroup/echomimic, commit a53e970); this file holds none
of its code. Run it in a venv with EchoMimic's diffusers pin, not in the product's environment:

    python3 -m venv /tmp/venv-echomimic
    /tmp/venv-echomimic/bin/pip install torch==2.13.0 diffusers==0.24.0 huggingface_hub==0.20.3 \
        transformers==4.38.2 "numpy<2" einops==0.4.1 omegaconf==2.3.0 ffmpeg-python==0.2.0 tqdm safetensors
    /tmp/venv-echomimic/bin/python tools/golden_echomimic.py --echomimic /tmp/echomimic-src \
        --out /tmp/golden-echomimic-128-w32-64-64-96-s1 --size 128 --widths 32,64,64,96 --seed 1
    python -m server.cli parity /tmp/golden-echomimic-128-w32-64-64-96-s1     # our importer against it

What a set holds (random weights of the given shapes, every layer non-zero; compute float32 on CPU, 1 thread):
- weights/: reference_unet.pth, denoising_unet.pth (without motion_modules.*), motion_module.pth,
  face_locator.pth (fp32 state dicts, as published) and whisper_tiny.pt ({'dims', 'model_state_dict'} fp16,
  OpenAI's layout); loaded back the way the infer scripts load them (reference strictly, denoiser over
  motion-module weights with strict=False, whisper through EchoMimic's load_model);
- face_locator.safetensors: the infer script's mask rule for a given box and EchoMimic's FaceLocator;
- audio.safetensors: EchoMimic's Audio2Feature over the whole file (audio2feat, feature2chunks);
- denoiser_single.safetensors: one call with EchoMimic's ReferenceAttentionControl (fp16 bank as update()
  casts it, and an fp32-bank variant) and the guided [uncond, cond] call as the pipelines form it;
- acc_loop / acc_long_video / std_long_video_cfg (names per --samplers): the Audio2VideoPipeline.__call__ of
  pipeline_echo_mimic_acc / pipeline_echo_mimic itself (a stand-in VAE hands over the reference latents),
  recording what scheduler.step receives at every step, each window's raw output at step 0, and the final
  latents.
Set layout and case.json keys follow the shared set's README; the sampler's steps, guidance, frames, context
frames and overlap are options (the published runs: acc 6 steps guidance 1.0, normal 30 steps guidance 2.5,
context 12, overlap 3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import types
import wave
from pathlib import Path

import numpy as np

from _golden_common import StandInVae, git_commit, randomize, save   # tools/ is on sys.path when this runs

# the checkout these sets were made from came as an archive of the fetched snapshot
ECHOMIMIC_UNKNOWN_COMMIT = "a53e970 (archive of the fetched snapshot; no .git in the checkout)"

SAMPLERS = {   # name -> (pipeline module, frames, steps, guidance, noise seed offset)
    "acc_loop": ("pipeline_echo_mimic_acc", 12, 3, 1.0, 0),
    "acc_long_video": ("pipeline_echo_mimic_acc", 24, 3, 1.0, 1),
    "std_long_video_cfg": ("pipeline_echo_mimic", 24, 2, 2.5, 2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--echomimic", required=True, help="checkout of github antgroup/echomimic")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (square; latents are /8)")
    p.add_argument("--widths", default="32,32,32,32", help="block_out_channels (per UNet level)")
    p.add_argument("--layers", type=int, default=1, help="layers_per_block")
    p.add_argument("--groups", type=int, default=32, help="norm_num_groups")
    p.add_argument("--heads", type=int, default=8, help="attention_head_dim (diffusers 0.24: the head count)")
    p.add_argument("--face-widths", default="4,8,16,16", help="FaceLocator block_out_channels")
    p.add_argument("--whisper-layers", type=int, default=1, help="whisper encoder depth (width stays 384)")
    p.add_argument("--whisper-heads", type=int, default=6)
    p.add_argument("--audio", help="16 kHz mono PCM16 WAV (default: 1 s of a synthetic tone + noise)")
    p.add_argument("--audio-seconds", type=float, default=0.0, help="use only the first N seconds (0: all)")
    p.add_argument("--fps", type=int, default=24, help="video rate the pipelines cut audio features at")
    p.add_argument("--timestep", type=int, default=832, help="the single denoiser call's timestep")
    p.add_argument("--samplers", default="acc_loop,acc_long_video,std_long_video_cfg",
                   help="sampler cases to run, each NAME or NAME:frames:steps:guidance "
                        "(NAME acc_* runs the acc pipeline, anything else the normal one)")
    p.add_argument("--context-frames", type=int, default=12)
    p.add_argument("--context-overlap", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="weights, inputs and (plus 1040 + i) the samplers' noise")
    p.add_argument("--skip-denoiser", action="store_true", help="audio and face locator cases only")
    return p.parse_args(argv)


def import_echomimic(path: str):
    """EchoMimic's modules from the checkout, with two stand-ins for a CPU box without ffmpeg: its whisper
    loads audio through the ffmpeg CLI (a PCM16 WAV reader returns what ffmpeg's s16le output gives, int16 /
    32768), and its reference control puts a mask on CUDA (the default device argument becomes the CPU)."""
    sys.path.insert(0, str(Path(path).resolve()))
    import src.models.face_locator as fl
    import src.models.mutual_self_attention as msa
    import src.models.unet_2d_condition as u2
    import src.models.unet_3d_echo as u3
    import src.models.whisper.audio2feature as a2f
    import src.models.whisper.whisper.audio as waudio
    import src.pipelines.pipeline_echo_mimic as p_std
    import src.pipelines.pipeline_echo_mimic_acc as p_acc

    waudio.load_audio = lambda file, sr=16000: read_wav(file)
    # its reference control builds the guidance row mask on a hard-coded CUDA device (a default argument)
    import torch
    hooks = msa.ReferenceAttentionControl.register_reference_hooks
    hooks.__defaults__ = tuple(torch.device("cpu") if isinstance(d, torch.device) else d for d in hooks.__defaults__)
    return types.SimpleNamespace(FaceLocator=fl.FaceLocator, ReferenceAttentionControl=msa.ReferenceAttentionControl,
                                 UNet2DConditionModel=u2.UNet2DConditionModel,
                                 EchoUNet3DConditionModel=u3.EchoUNet3DConditionModel,
                                 Audio2Feature=a2f.Audio2Feature, whisper_audio=waudio,
                                 pipelines={"pipeline_echo_mimic": p_std, "pipeline_echo_mimic_acc": p_acc})


def read_wav(path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != 16000:
            raise SystemExit(f"golden_echomimic: {path}: need 16 kHz mono PCM16")
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.astype(np.int16).tobytes())


def synthetic_speech(seconds: float, gen) -> np.ndarray:
    """int16 samples: a voiced-like tone with vibrato plus noise bursts (only something for whisper to see)."""
    import torch
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    noise = torch.randn(len(t), generator=gen).numpy()
    return np.clip((0.25 * tone * env + 0.05 * noise) * 32767, -32768, 32767).astype(np.int16)


def make_case(a) -> dict:
    widths = [int(v) for v in a.widths.split(",")]
    base = dict(sample_size=a.size // 8, in_channels=4, out_channels=4, center_input_sample=False,
                flip_sin_to_cos=True, freq_shift=0, block_out_channels=widths, layers_per_block=a.layers,
                downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=a.groups,
                norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=a.heads)
    return {
        "set": f"generated {a.size}px widths {widths} layers {a.layers} seed {a.seed}",
        "model": "echomimic-v1",
        "repo": f"github antgroup/echomimic (commit {git_commit(a.echomimic, ECHOMIMIC_UNKNOWN_COMMIT)})",
        "diffusers": "0.24.0 (repo pin)",
        "dtype": "float32 everywhere, CPU",
        "torch_threads": 1,
        "weights": {"reference_unet.pth": "reference UNet state dict (fp32), loaded strict=True",
                    "denoising_unet.pth": "denoiser state dict without motion_modules.* (strict=False)",
                    "motion_module.pth": "only *.motion_modules.* keys (AnimateDiff naming, incl. pe buffers)",
                    "face_locator.pth": "FaceLocator state dict",
                    "whisper_tiny.pt": "{'dims', 'model_state_dict' (fp16)} OpenAI layout",
                    "whisper_dims": {"n_mels": 80, "n_vocab": 64, "n_audio_ctx": 1500, "n_audio_state": 384,
                                     "n_audio_head": a.whisper_heads, "n_audio_layer": a.whisper_layers,
                                     "n_text_ctx": 16, "n_text_state": 64, "n_text_head": 2, "n_text_layer": 1}},
        "unet_2d_config": dict(base, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                               mid_block_type="UNetMidBlock2DCrossAttn",
                               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "unet_3d_config": dict(base, down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                               mid_block_type="UNetMidBlock3DCrossAttn",
                               up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3),
        "unet_additional_kwargs": {
            "use_inflated_groupnorm": True, "unet_use_cross_frame_attention": False,
            "unet_use_temporal_attention": False, "use_motion_module": True, "cross_attention_dim": 384,
            "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": True,
            "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
            "motion_module_kwargs": {"num_attention_heads": 8, "num_transformer_block": 1,
                                     "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                                     "temporal_position_encoding": True,
                                     "temporal_position_encoding_max_len": 32, "temporal_attention_dim_div": 1}},
        "noise_scheduler_kwargs": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
                                   "clip_sample": False, "steps_offset": 1, "prediction_type": "v_prediction",
                                   "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        "face_locator": {"conditioning_embedding_channels": widths[0], "conditioning_channels": 1,
                         "block_out_channels": [int(v) for v in a.face_widths.split(",")]},
    }


def build(E, case: dict):
    import torch
    ref = E.UNet2DConditionModel.from_config(dict(case["unet_2d_config"]))
    den = E.EchoUNet3DConditionModel.from_config(dict(case["unet_3d_config"], _class_name="EchoUNet3DConditionModel"),
                                                 **case["unet_additional_kwargs"])
    fl = case["face_locator"]
    face = E.FaceLocator(fl["conditioning_embedding_channels"], conditioning_channels=fl["conditioning_channels"],
                         block_out_channels=tuple(fl["block_out_channels"]))
    from src.models.whisper.whisper.model import ModelDimensions, Whisper
    whisper = Whisper(ModelDimensions(**case["weights"]["whisper_dims"]))
    return ref, den, face, whisper, torch


def write_weights(E, case: dict, folder: Path, gen) -> None:
    ref, den, face, whisper, torch = build(E, case)
    for m in (ref, den, face, whisper):
        randomize(m, gen)
    sd = den.state_dict()
    torch.save(ref.state_dict(), folder / "reference_unet.pth")
    torch.save({k: v for k, v in sd.items() if "motion_modules." not in k}, folder / "denoising_unet.pth")
    torch.save({k: v for k, v in sd.items() if "motion_modules." in k}, folder / "motion_module.pth")
    torch.save(face.state_dict(), folder / "face_locator.pth")
    torch.save({"dims": dict(case["weights"]["whisper_dims"]),
                "model_state_dict": {k: v.half() for k, v in whisper.state_dict().items()}},
               folder / "whisper_tiny.pt")


def load_like_infer(E, case: dict, folder: Path):
    """The infer scripts' loading: reference strictly (from_pretrained leaves it in eval mode), the denoiser
    built from config (training mode, as from_pretrained_2d leaves it) with the motion-module weights and then
    denoising_unet.pth over them (strict=False), the face locator strictly, whisper via load_audio_model."""
    import torch
    from src.models.whisper.audio2feature import load_audio_model
    ref = E.UNet2DConditionModel.from_config(dict(case["unet_2d_config"]))
    ref.load_state_dict(torch.load(folder / "reference_unet.pth", map_location="cpu", weights_only=True))
    ref.eval()
    den = E.EchoUNet3DConditionModel.from_config(dict(case["unet_3d_config"], _class_name="EchoUNet3DConditionModel"),
                                                 **case["unet_additional_kwargs"])
    mm = den.load_state_dict(torch.load(folder / "motion_module.pth", map_location="cpu", weights_only=True),
                             strict=False)
    rest = den.load_state_dict(torch.load(folder / "denoising_unet.pth", map_location="cpu", weights_only=True),
                               strict=False)
    assert not mm.unexpected_keys and not rest.unexpected_keys
    assert not set(mm.missing_keys) & set(rest.missing_keys), "a denoiser weight is in neither file"
    fl = case["face_locator"]
    face = E.FaceLocator(fl["conditioning_embedding_channels"], conditioning_channels=fl["conditioning_channels"],
                         block_out_channels=tuple(fl["block_out_channels"]))
    face.load_state_dict(torch.load(folder / "face_locator.pth", map_location="cpu", weights_only=True))
    for m in (ref, den, face):
        m.requires_grad_(False)
    audio = load_audio_model(model_path=str(folder / "whisper_tiny.pt"), device="cpu")
    return ref, den, face, audio


def face_mask_case(face, size: int, box) -> dict:
    """The infer script's mask: the box grown by 10% of its size on each side, 255 inside, /255, (1,1,1,H,W)."""
    import torch
    x0, y0, x1, y1 = box
    mask = np.zeros((size, size), np.uint8)
    rp, cp = int((y1 - y0) * 0.1), int((x1 - x0) * 0.1)
    mask[y0 - rp:y1 + rp, x0 - cp:x1 + cp] = 255
    t = torch.Tensor(mask).unsqueeze(0).unsqueeze(0).unsqueeze(0) / 255.0
    with torch.no_grad():
        return {"face_mask": t, "face_feature": face(t)}


def audio_case(E, audio, wav_path: Path, fps: int) -> dict:
    import torch
    wav = read_wav(wav_path)
    feats = audio.audio2feat(str(wav_path))
    chunks = audio.feature2chunks(feature_array=feats, fps=fps)
    index = [audio.get_sliced_feature(feature_array=feats, vid_idx=i, fps=fps)[1] for i in range(len(chunks))]
    return {"waveform": torch.from_numpy(wav.copy()), "log_mel": E.whisper_audio.log_mel_spectrogram(wav),
            "whisper_features": torch.from_numpy(np.ascontiguousarray(feats)),
            "whisper_chunks": torch.from_numpy(np.ascontiguousarray(chunks)),
            "chunk_feature_index": torch.tensor(index, dtype=torch.int64)}


def bank_pairing(ref, den) -> dict:
    """Which ReferenceNet block's bank each denoiser block got from update(), found by value (not by
    re-deriving EchoMimic's sort): {denoiser block: reference block}."""
    writers = {n: m.bank[0] for n, m in ref.named_modules() if getattr(m, "bank", None)}
    pairs = {}
    for name, m in den.named_modules():
        if getattr(m, "bank", None):
            got = m.bank[0].float()
            hits = [w for w, b in writers.items() if b.shape == got.shape and bool((b.to(m.bank[0].dtype).float()
                                                                                    == got).all())]
            pairs[name] = hits[0] if len(hits) == 1 else hits
    return pairs


def denoiser_single(E, ref, den, ref_latents, latents, t, audio_tokens, face_feature, out_pairing) -> dict:
    import torch
    out = {}
    with torch.no_grad():
        for key, dtype in (("pred", torch.float16), ("pred_bank_fp32", torch.float32)):
            writer = E.ReferenceAttentionControl(ref, do_classifier_free_guidance=False, mode="write",
                                                 batch_size=1, fusion_blocks="full")
            reader = E.ReferenceAttentionControl(den, do_classifier_free_guidance=False, mode="read",
                                                 batch_size=1, fusion_blocks="full")
            ref(ref_latents, torch.zeros_like(t), encoder_hidden_states=None, return_dict=False)
            reader.update(writer, dtype=dtype)
            if key == "pred":
                out_pairing.update(bank_pairing(ref, den))
            out[key] = den(latents, t, encoder_hidden_states=None, audio_cond_fea=audio_tokens,
                           face_musk_fea=face_feature, return_dict=False)[0]
            reader.clear()
            writer.clear()
        # guided, as the pipelines form it: reference once (batch 1), bank doubled by update(), [uncond, cond]
        writer = E.ReferenceAttentionControl(ref, do_classifier_free_guidance=True, mode="write", batch_size=1,
                                             fusion_blocks="full")
        reader = E.ReferenceAttentionControl(den, do_classifier_free_guidance=True, mode="read", batch_size=1,
                                             fusion_blocks="full")
        ref(ref_latents, torch.zeros_like(t), encoder_hidden_states=None, return_dict=False)
        reader.update(writer, do_classifier_free_guidance=True)
        pair = den(latents.repeat(2, 1, 1, 1, 1), t, encoder_hidden_states=None,
                   audio_cond_fea=torch.cat([torch.zeros_like(audio_tokens), audio_tokens]),
                   face_musk_fea=torch.cat([torch.zeros_like(face_feature), face_feature]), return_dict=False)[0]
        reader.clear()
        writer.clear()
    out["cfg_pred_uncond"], out["cfg_pred_cond"] = (x.contiguous() for x in pair.chunk(2))
    return out


def sampler_case(E, models, case: dict, a, name: str, spec: tuple, wav_path: Path, ref_latents, face_mask) -> tuple:
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image
    ref, den, face, audio = models
    module, frames, steps, guidance, seed = spec
    pipe_cls = E.pipelines[module].Audio2VideoPipeline
    scheduler = DDIMScheduler(**case["noise_scheduler_kwargs"])
    pipe = pipe_cls(vae=StandInVae(ref_latents, (a.size, a.size)), reference_unet=ref, denoising_unet=den, audio_guider=audio,
                    face_locator=face, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    rec: dict = {}
    outputs: list = []
    calls: list = []
    orig_prepare, orig_step = pipe.prepare_latents, scheduler.step

    def prepare(*args, **kwargs):
        lat = orig_prepare(*args, **kwargs)
        rec["initial_latents"] = lat.clone()
        return lat

    def step(model_output, t, latents, *args, **kwargs):
        out = orig_step(model_output, t, latents, *args, **kwargs)
        outputs.append(model_output.clone())
        rec["final_latents"] = out.prev_sample.clone()
        return out

    handle = den.register_forward_hook(lambda _m, _a, o: calls.append(o[0].clone()) if len(outputs) == 0 else None)
    pipe.prepare_latents, scheduler.step = prepare, step
    try:
        with torch.no_grad():
            pipe(Image.new("RGB", (a.size, a.size)), str(wav_path), face_mask, a.size, a.size, frames, steps,
                 guidance, generator=torch.manual_seed(seed), audio_sample_rate=16000,
                 context_frames=a.context_frames, fps=a.fps, context_overlap=a.context_overlap)
    finally:
        handle.remove()
    rec["timesteps"] = scheduler.timesteps.float()
    rec["ref_latents"] = ref_latents
    for i, mo in enumerate(outputs):
        rec[f"step{i}_model_output"] = mo
    for j, out in enumerate(calls):
        rec[f"step0_call{j}_out"] = out   # raw output (both halves when guided) of window j at step 0
    frames = rec["initial_latents"].shape[2]
    windows = list(E.pipelines[module].get_context_scheduler("uniform")(0, steps, frames, a.context_frames, 1,
                                                                         a.context_overlap))
    meta = {"file": f"{name}.safetensors", "pipeline": f"{module}.Audio2VideoPipeline", "video_length": frames,
            "num_inference_steps": steps, "guidance_scale": guidance,
            "generator": f"torch.manual_seed({seed}) (CPU default generator), eta 0.0",
            "timesteps": [int(v) for v in scheduler.timesteps], "context_frames": a.context_frames,
            "context_overlap": a.context_overlap, "context_stride": 1, "context_batch_size": 1, "fps": a.fps,
            "audio_tokens": f"audio.safetensors:whisper_chunks[:{frames}] (the pipeline computed them itself)",
            "face_feature": "face_locator.safetensors:face_feature (uncond: zeros)", "ref_latents_file_key":
            "ref_latents", "windows_step0": windows,
            "windows_per_step_after_rotation": [[[(f + 2 * i) % frames for f in w] for w in windows]
                                                for i in range(steps)],
            "n_denoiser_calls": len(windows) * steps, "tensors": {k: list(v.shape) for k, v in rec.items()}}
    if guidance > 1:   # the raw window outputs are [uncond, cond]: parity compares single-batch calls only
        for j in range(len(calls)):
            del rec[f"step0_call{j}_out"]
            del meta["tensors"][f"step0_call{j}_out"]
    return rec, meta


def parse_samplers(text: str) -> dict:
    out = {}
    for i, item in enumerate(text.split(",")):
        if not item:
            continue
        name, *rest = item.split(":")
        if rest:
            module = "pipeline_echo_mimic_acc" if name.startswith("acc") else "pipeline_echo_mimic"
            out[name] = (module, int(rest[0]), int(rest[1]), float(rest[2]), i)
        elif name in SAMPLERS:
            out[name] = SAMPLERS[name]
        else:
            raise SystemExit(f"golden_echomimic: unknown sampler {name!r} (known: {', '.join(SAMPLERS)}; or "
                             f"NAME:frames:steps:guidance)")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    torch.set_num_threads(1)
    out = Path(a.out)
    if out.exists():
        sys.exit(f"golden_echomimic: {out} exists; pick a new folder")
    E = import_echomimic(a.echomimic)
    case = make_case(a)
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    (out / "weights").mkdir(parents=True)
    write_weights(E, case, out / "weights", gen)
    ref, den, face, audio = load_like_infer(E, case, out / "weights")

    wav_path = out / "audio.wav"
    if a.audio:
        samples = np.round(read_wav(a.audio) * 32768).astype(np.int16)
        if a.audio_seconds:
            samples = samples[: int(a.audio_seconds * 16000)]
    else:
        samples = synthetic_speech(a.audio_seconds or 1.0, gen)
    write_wav(wav_path, samples)

    s = a.size
    box = [int(s * 0.31), int(s * 0.23), int(s * 0.7), int(s * 0.78)]
    fc = face_mask_case(face, s, box)
    save(out, "face_locator.safetensors", fc, keep_int64=True)
    case["face_locator_case"] = {"file": "face_locator.safetensors", "face_mask": list(fc["face_mask"].shape),
                                 "face_feature": list(fc["face_feature"].shape), "face_box_xyxy_pixels": box,
                                 "image_hw": [s, s], "mask_rule": "infer script: box grown by int(10% of its "
                                 "size) per side, 255 inside, /255, shaped (1, 1, 1, H, W)"}
    au = audio_case(E, audio, wav_path, a.fps)
    save(out, "audio.safetensors", au, keep_int64=True)
    case["audio_case"] = {"file": "audio.safetensors", "wav": "audio.wav (16 kHz mono PCM16)",
                          "seconds": len(samples) / 16000, "fps": a.fps, **{k: list(v.shape) for k, v in au.items()},
                          "source": a.audio or "synthetic tone + noise"}

    if not a.skip_denoiser:
        lat = s // 8
        frames = min(12, len(au["whisper_chunks"]))
        dn = {"ref_latents": torch.randn(1, 4, lat, lat, generator=gen),
              "latents": torch.randn(1, 4, frames, lat, lat, generator=gen), "timestep": torch.tensor([a.timestep])}
        pairing: dict = {}
        dn.update(denoiser_single(E, ref, den, dn["ref_latents"], dn["latents"], dn["timestep"],
                                  au["whisper_chunks"][:frames][None], fc["face_feature"], pairing))
        save(out, "denoiser_single.safetensors", dn, keep_int64=True)
        case["denoiser_single_case"] = {
            "file": "denoiser_single.safetensors", "timestep": a.timestep,
            "tensors": {k: list(v.shape) for k, v in dn.items()},
            "outputs": {"pred": "fp16 bank (ReferenceAttentionControl.update's default)",
                        "pred_bank_fp32": "bank kept float32",
                        "cfg_pred_uncond / cfg_pred_cond": "one guided call [uncond, cond] as the pipelines"},
            "bank_pairing": pairing,
            "bank_pairing_same_block_name": all(k == v for k, v in pairing.items())}
        case["sampler_cases"] = {}
        for i, (name, spec) in enumerate(parse_samplers(a.samplers).items()):
            spec = spec[:4] + (1040 + a.seed * 10 + i,)
            ref_latents = torch.randn(1, 4, lat, lat, generator=gen)
            rec, meta = sampler_case(E, (ref, den, face, audio), case, a, name, spec, wav_path, ref_latents,
                                     fc["face_mask"])
            save(out, f"{name}.safetensors", rec, keep_int64=True)
            case["sampler_cases"][name] = meta
            print(f"golden_echomimic: {name} done ({meta['n_denoiser_calls']} denoiser calls)", flush=True)

    case["generator"] = {"tool": "tools/golden_echomimic.py", "argv": sys.argv[1:] if argv is None else argv,
                         "torch": torch.__version__}
    case["files"] = [{"path": p.relative_to(out).as_posix(), "bytes": p.stat().st_size,
                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                     for p in sorted(out.rglob("*")) if p.is_file()]
    (out / "case.json").write_text(json.dumps(case, indent=1))
    print(f"golden_echomimic: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
