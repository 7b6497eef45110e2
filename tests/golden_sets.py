"""Test-only generators of golden-format folders (the layout of ../shared/golden/{echomimic-v1,hallo}) at
architectures and case settings that differ from the shared dev sets in every knob case.json carries.

What this proves, and what it does not: the weights are random, written in the published files' formats
and key names (the inverse of our importers), and the reference outputs are computed by OUR implementation.
Replaying such a folder with `emo-stream parity` therefore checks that the command works on any folder in
the format (every size, file name, seed, box, window, step count and guidance is read from case.json or the
weight files' shapes, nothing is tied to the dev sets), NOT that our numbers equal the original code's: that
is what the shared sets, made by the original repositories, are for.

    make_echomimic_set(root)   # -> root (case.json, weights/, *.safetensors, a wav)
    make_hallo_set(root)

`spec` overrides (dicts below) let a test vary one thing more; the defaults are already far from the dev sets.
"""

from __future__ import annotations

import copy
import json
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear", "clip_sample": False,
             "steps_offset": 1, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
             "timestep_spacing": "trailing"}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in tensors.items()}, str(path))


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in tensors.items()}


def write_wav(path: Path, seconds: float, seed: int) -> None:
    """Speech-like test audio: a few tones plus noise, 16 kHz mono PCM16."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * 16000))) / 16000
    x = sum(0.2 * np.sin(2 * np.pi * f * t) * (1 + np.sin(2 * np.pi * 3 * t + f)) for f in (180, 420, 950))
    x = x + 0.05 * rng.standard_normal(len(t))
    pcm = np.clip(x * 0.5 * 32767, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _hw(spec: dict[str, Any]) -> tuple[int, int]:
    """spec["image"]: a side (square) or [height, width] in pixels (each a multiple of 8 * 2^(levels - 1))."""
    image = spec["image"]
    return (int(image), int(image)) if isinstance(image, int) else (int(image[0]), int(image[1]))


def _unet_config(channels, layers, heads, groups, cross_dim, latent, kind: str) -> dict[str, Any]:
    cross, plain = f"CrossAttnDownBlock{kind}", f"DownBlock{kind}"
    levels = len(channels)
    return {"sample_size": latent, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
            "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": [cross] * (levels - 1) + [plain],
            "mid_block_type": f"UNetMidBlock{kind}CrossAttn",
            "up_block_types": [f"UpBlock{kind}"] + [f"CrossAttnUpBlock{kind}"] * (levels - 1),
            "block_out_channels": list(channels), "layers_per_block": layers, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": groups, "norm_eps": 1e-5,
            "cross_attention_dim": cross_dim, "attention_head_dim": heads}


# ---- EchoMimic v1 -----------------------------------------------------------------------------------
ECHO_SPEC: dict[str, Any] = dict(
    channels=[64, 64, 64, 64], layers=2, heads=4, groups=32, image=64, whisper_layers=2, whisper_heads=4,
    face_channels=[8, 8, 16, 24], motion_heads=4, motion_blocks=1, pe_max_len=20, seconds=0.9, fps=25,
    box=[6, 10, 50, 58], timestep=700, weights_set="acc", seed=11,
    samplers={
        "short_acc": dict(pipeline="pipeline_echo_mimic_acc.Audio2VideoPipeline", frames=10, steps=4, guidance=1.0,
                          context=10, overlap=2, seed=21),
        "long_cfg": dict(pipeline="pipeline_echo_mimic.Audio2VideoPipeline (non-acc)", frames=16, steps=3,
                         guidance=3.0, context=8, overlap=2, seed=22, calls=True),
        "long_nocfg": dict(pipeline="pipeline_echo_mimic.Audio2VideoPipeline (non-acc)", frames=16, steps=2,
                           guidance=1.0, context=8, overlap=3, seed=23),
    })


def _motion_module_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """AnimateDiff's temporal module settings, written alike in EchoMimic's and Hallo's configs."""
    return {"num_attention_heads": spec["motion_heads"], "num_transformer_block": spec["motion_blocks"],
            "attention_block_types": ["Temporal_Self", "Temporal_Self"], "temporal_position_encoding": True,
            "temporal_position_encoding_max_len": spec["pe_max_len"], "temporal_attention_dim_div": 1}


def echomimic_case(spec: dict[str, Any]) -> dict[str, Any]:
    from emo_stream.families.echomimic.importer import WEIGHT_SETS

    lat = _hw(spec)[0] // 8
    den_file, mm_file = WEIGHT_SETS[spec["weights_set"]]
    c2 = _unet_config(spec["channels"], spec["layers"], spec["heads"], spec["groups"], 768, lat, "2D")
    c3 = _unet_config(spec["channels"], spec["layers"], spec["heads"], spec["groups"], 768, lat, "3D")
    levels = len(spec["channels"])
    return {
        "set": "generated by tests/golden_sets.py (our own outputs; plumbing check, not numerics)",
        "model": "echomimic-v1", "dtype": "float32", "torch_threads": 1,
        "weights": {"reference_unet.pth": "generated", den_file: "generated", mm_file: "generated",
                    "face_locator.pth": "generated", "whisper_tiny.pt": "generated",
                    "whisper_dims": {"n_mels": 80, "n_vocab": 32, "n_audio_ctx": 1500, "n_audio_state": 384,
                                     "n_audio_head": spec["whisper_heads"], "n_audio_layer": spec["whisper_layers"],
                                     "n_text_ctx": 8, "n_text_state": 32, "n_text_head": 2, "n_text_layer": 1}},
        "unet_2d_config": c2, "unet_3d_config": c3,
        "unet_additional_kwargs": {
            "use_inflated_groupnorm": True, "unet_use_cross_frame_attention": False,
            "unet_use_temporal_attention": False, "use_motion_module": True, "cross_attention_dim": 384,
            "motion_module_resolutions": [2 ** i for i in range(levels)], "motion_module_mid_block": True,
            "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
            "motion_module_kwargs": _motion_module_kwargs(spec)},
        "noise_scheduler_kwargs": dict(SCHEDULER),
        "face_locator": {"conditioning_embedding_channels": spec["channels"][0], "conditioning_channels": 1,
                         "block_out_channels": list(spec["face_channels"])},
        "face_locator_case": {"file": "face_case.safetensors", "face_box_xyxy_pixels": list(spec["box"]),
                              "image_hw": list(_hw(spec))},
        "audio_case": {"file": "audio_feats.safetensors", "wav": "speech.wav (16 kHz mono PCM16)",
                       "seconds": spec["seconds"], "fps": spec["fps"]},
        "denoiser_single_case": {"file": "one_call.safetensors"},
        "sampler_cases": {},
    }


def echomimic_denoiser_case(model, ref: torch.Tensor, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                            face: torch.Tensor) -> dict[str, torch.Tensor]:
    """EchoMimic's denoiser at one step, as a set's denoiser_single case stores it: the prediction, the same with
    the reference bank kept in float32, and the guidance pair (unconditioned, conditioned) as one batch of two."""
    bank = model.encode_reference(ref)
    pair = model.denoise(x.repeat(2, 1, 1, 1, 1), t[0], torch.cat([torch.zeros_like(tokens), tokens]),
                         torch.cat([torch.zeros_like(face), face]), torch.tensor([False, True]), bank)
    model.config.bank_dtype = "float32"
    bank32 = model.encode_reference(ref)
    model.config.bank_dtype = "float16"
    return {"ref_latents": ref, "latents": x, "timestep": t,
            "pred": model.denoise(x, t[0], tokens, face, None, bank),
            "pred_bank_fp32": model.denoise(x, t[0], tokens, face, None, bank32),
            "cfg_pred_uncond": pair[:1], "cfg_pred_cond": pair[1:]}


def make_echomimic_set(root: Path, **overrides: Any) -> Path:
    from emo_stream.families.echomimic.sampling import (EchoSampling, context_windows, initial_latents, make_scheduler,
                                               rotated, sample)
    from emo_stream.families.echomimic.audio import frame_rows, log_mel
    from emo_stream.families.echomimic.layers import face_mask
    from emo_stream.families.echomimic.parity import _read_wav, config_from_case
    from emo_stream.families.echomimic.testing import live_model, published_files

    spec = {**copy.deepcopy(ECHO_SPEC), **overrides}
    root = Path(root)
    (root / "weights").mkdir(parents=True)
    case = echomimic_case(spec)
    config = config_from_case(case)
    model = live_model(config, seed=spec["seed"]).eval()
    for name, content in published_files(model, spec["weights_set"]).items():
        (root / "weights" / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(content, root / "weights" / name)
    gen = torch.Generator().manual_seed(spec["seed"])

    with torch.no_grad():
        wav_name = case["audio_case"]["wav"].split()[0]
        write_wav(root / wav_name, spec["seconds"], spec["seed"])
        wav = _read_wav(root / wav_name)
        feats = model.audio_features(wav)
        chunks = model.audio_tokens(wav, fps=spec["fps"])
        audio = {"waveform": wav, "log_mel": log_mel(wav, 80), "whisper_features": feats, "whisper_chunks": chunks,
                 "chunk_feature_index": frame_rows(len(chunks), feats.shape[0], spec["fps"])}
        _save(audio, root / case["audio_case"]["file"])
        case["audio_case"].update(_shapes(audio))

        mask = face_mask(spec["box"], *_hw(spec), clamp=False)
        face = model.face_feature(mask)
        _save({"face_mask": mask, "face_feature": face}, root / case["face_locator_case"]["file"])

        lat = tuple(v // 8 for v in _hw(spec))
        frames = max(s["frames"] for s in spec["samplers"].values())
        ref = torch.randn(1, 4, *lat, generator=gen)
        x = torch.randn(1, 4, frames, *lat, generator=gen)
        t = torch.tensor([spec["timestep"]])
        tokens = chunks[:frames][None]
        single = echomimic_denoiser_case(model, ref, x, t, tokens, face)
        _save(single, root / case["denoiser_single_case"]["file"])
        case["denoiser_single_case"]["tensors"] = _shapes(single)   # listed, so a missing one is an error

        for name, s in spec["samplers"].items():
            acc = "_acc" in s["pipeline"]
            settings = EchoSampling(steps=s["steps"], guidance=s["guidance"], context_frames=s["context"],
                                    context_overlap=s["overlap"], pseudo_velocity=acc, sum_unguided_overlaps=not acc)
            x0 = initial_latents((1, 4, s["frames"], *lat), torch.Generator().manual_seed(s["seed"]))
            sref = torch.randn(1, 4, *lat, generator=gen)
            sched = make_scheduler(**case["noise_scheduler_kwargs"])
            outs: dict[str, torch.Tensor] = {}
            calls: list[torch.Tensor] = []
            den = model.denoiser_fn(model.encode_reference(sref))

            def record(*args, _den=den, _calls=calls):
                out = _den(*args)
                _calls.append(out)
                return out

            final = sample(record, x0, chunks[: s["frames"]][None], face, settings, scheduler=sched,
                           on_step=lambda i, v, _o=outs: _o.__setitem__(f"step{i}_model_output", v))
            windows = context_windows(s["frames"], s["context"], s["overlap"])
            tensors = {"initial_latents": x0, "timesteps": sched.timesteps.clone(), "ref_latents": sref,
                       **outs, "final_latents": final}
            if s.get("calls"):
                tensors.update({f"step0_call{j}_out": calls[j] for j in range(len(windows))})
            file = f"{name}_run.safetensors"
            _save(tensors, root / file)
            case["sampler_cases"][name] = {
                "file": file, "pipeline": s["pipeline"], "video_length": s["frames"],
                "num_inference_steps": s["steps"], "guidance_scale": s["guidance"],
                "generator": f"torch.manual_seed({s['seed']}) (CPU default generator), eta 0.0",
                "timesteps": [int(v) for v in sched.timesteps], "context_frames": s["context"],
                "context_overlap": s["overlap"], "context_stride": 1, "context_batch_size": 1, "fps": spec["fps"],
                "windows_step0": windows,
                "windows_per_step_after_rotation": [rotated(windows, i, 2, s["frames"]) for i in range(s["steps"])],
                "tensors": _shapes(tensors)}
    (root / "case.json").write_text(json.dumps(case, indent=1))
    return root


# ---- Hallo --------------------------------------------------------------------------------------------
HALLO_SPEC: dict[str, Any] = dict(
    channels=[64, 64, 64, 64], layers=2, heads=4, groups=32, image=[64, 128], cross_dim=16, audio_dim=24,
    face_channels=[8, 8, 16, 24], id_tokens=2, wav_hidden=32, wav_layers=3, wav_heads=4, wav_inter=48,
    proj_inter=40, context_tokens=6, motion_heads=4, motion_blocks=1, pe_max_len=24, clip_length=12,
    motion_frames=3, seconds=0.9, fps=25, steps=4, guidance=2.5, timestep=512, seed=7,
    motion_scale=[1.0, 0.8, 1.3], face_box=[20, 8, 90, 56], lip_box=[40, 40, 70, 50])


def hallo_case(spec: dict[str, Any]) -> dict[str, Any]:
    lat = _hw(spec)[0] // 8
    return {
        "set": "generated by tests/golden_sets.py (our own outputs; plumbing check, not numerics)",
        "model": "hallo", "dtype": "weights fp16, compute float32", "torch_threads": 1,
        "weights": {"net.pth": "generated", "wav2vec2-base-960h/": "generated",
                    "wav2vec2_config": {"hidden_size": spec["wav_hidden"], "num_hidden_layers": spec["wav_layers"],
                                        "num_attention_heads": spec["wav_heads"],
                                        "intermediate_size": spec["wav_inter"]}},
        "unet_2d_config": _unet_config(spec["channels"], spec["layers"], spec["heads"], spec["groups"],
                                       spec["cross_dim"], lat, "2D"),
        "unet_3d_config": _unet_config(spec["channels"], spec["layers"], spec["heads"], spec["groups"],
                                       spec["cross_dim"], lat, "3D"),
        "unet_additional_kwargs": {
            "use_inflated_groupnorm": True, "unet_use_cross_frame_attention": False,
            "unet_use_temporal_attention": False, "use_motion_module": True, "use_audio_module": True,
            "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": True,
            "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
            "motion_module_kwargs": _motion_module_kwargs(spec),
            "audio_attention_dim": spec["audio_dim"], "stack_enable_blocks_name": ["up", "down", "mid"],
            "stack_enable_blocks_depth": [0, 1, 2, 3]},
        "module_args": {
            "face_locator": {"conditioning_embedding_channels": spec["channels"][0], "conditioning_channels": 3,
                             "block_out_channels": list(spec["face_channels"])},
            "imageproj": {"cross_attention_dim": spec["cross_dim"], "clip_embeddings_dim": 512,
                          "clip_extra_context_tokens": spec["id_tokens"]},
            "audioproj": {"seq_len": 5, "blocks": spec["wav_layers"], "channels": spec["wav_hidden"],
                          "intermediate_dim": spec["proj_inter"], "output_dim": spec["audio_dim"],
                          "context_tokens": spec["context_tokens"]}},
        "noise_scheduler_kwargs": dict(SCHEDULER),
        "masks_and_face_case": {"file": "masks.safetensors", "image_hw": list(_hw(spec)),
                                "rules": ["face box: round(min/max) -> expand_region(ratio=face_expand_ratio 1.2)"]},
        "audio_case": {"file": "audio_feats.safetensors", "wav": "voice.wav (16 kHz mono PCM16)",
                       "seconds": spec["seconds"], "fps": spec["fps"], "clip_length": spec["clip_length"]},
        "denoiser_single_case": {"file": "one_call.safetensors", "timestep": spec["timestep"],
                                 "clip_length": spec["clip_length"], "n_motion_frames": spec["motion_frames"],
                                 "motion_scale": list(spec["motion_scale"])},
        "cfg_loop_case": {"file": "loop.safetensors", "num_inference_steps": spec["steps"],
                          "guidance_scale": spec["guidance"], "eta": 0.0,
                          "generator": f"torch.manual_seed({spec['seed'] + 100}); initial latents = randn (NO clamp)"},
    }


def _write_wav2vec2(folder: Path, model) -> None:
    """A Wav2Vec2ForCTC folder as published: wav2vec2.* keys, pos-conv weight norm as weight_g / weight_v."""
    folder.mkdir(parents=True)
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        state[f"wav2vec2.{k}"] = v.detach().clone().contiguous()
    vocab = 12
    state["lm_head.weight"] = torch.randn(vocab, model.config.hidden_size) * 0.02
    state["lm_head.bias"] = torch.zeros(vocab)
    save_file(state, str(folder / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.update(architectures=["Wav2Vec2ForCTC"], vocab_size=vocab)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
         "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000}))


def make_hallo_set(root: Path, **overrides: Any) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from emo_stream.blocks.wav2vec2 import load_wav2vec2
    from emo_stream.families.hallo import audio as haudio
    from emo_stream.families.hallo.config import HalloConfig
    from emo_stream.families.hallo.masks import LIP_IDS, SILHOUETTE_IDS, boxes_from_mediapipe, region_masks
    from emo_stream.families.hallo.model import ClipInputs, HalloModel

    spec = {**copy.deepcopy(HALLO_SPEC), **overrides}
    root = Path(root)
    (root / "weights").mkdir(parents=True)
    case = hallo_case(spec)
    torch.manual_seed(spec["seed"])
    wcfg = Wav2Vec2Config(hidden_size=spec["wav_hidden"], num_hidden_layers=spec["wav_layers"],
                          num_attention_heads=spec["wav_heads"], intermediate_size=spec["wav_inter"],
                          conv_dim=[16] * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                          do_stable_layer_norm=False, feat_extract_norm="group", conv_bias=False)
    _write_wav2vec2(root / "weights" / "wav2vec2-base-960h", Wav2Vec2Model(wcfg).eval())
    wav2vec2 = load_wav2vec2(root / "weights" / "wav2vec2-base-960h")

    config = HalloConfig.from_case(case)
    model = HalloModel(config, wav2vec2).eval()
    with torch.no_grad():   # every weight live (zero-initialised convs too), fp16-representable like net.pth
        for name, p in model.named_parameters():
            if not name.startswith("wav2vec2."):
                p.add_(torch.randn_like(p) * 0.05)
                p.copy_(p.half().float())
    torch.save({k: v.half() for k, v in model.net_state_dict().items()}, root / "weights" / "net.pth")
    # and back: the fp16 file also rounds the buffers (the motion modules' sinusoid tables), as Hallo's does
    model.load_net_state(torch.load(root / "weights" / "net.pth", weights_only=True))
    gen = torch.Generator().manual_seed(spec["seed"])

    with torch.no_grad():
        # masks and face identity: landmarks spanning the chosen boxes
        rng = np.random.default_rng(spec["seed"])
        lm = rng.uniform(spec["face_box"][:2], spec["face_box"][2:], size=(478, 2))
        lm[LIP_IDS] = rng.uniform(spec["lip_box"][:2], spec["lip_box"][2:], size=(len(LIP_IDS), 2))
        lm[SILHOUETTE_IDS[0]], lm[SILHOUETTE_IDS[1]] = spec["face_box"][:2], spec["face_box"][2:]
        lm[LIP_IDS[0]], lm[LIP_IDS[1]] = spec["lip_box"][:2], spec["lip_box"][2:]
        face_box, lip_box = boxes_from_mediapipe(lm)
        img_h, img_w = _hw(spec)
        rm = region_masks(face_box, lip_box, img_w, img_h, face_expand_ratio=1.2)
        levels = rm.levels((img_h, img_w), len(spec["channels"]))
        emb = torch.randn(1, 512, generator=gen) * 3
        cond, uncond = model.face_tokens(emb)
        mf = {"face_region": rm.face_region(), "face_embedding": emb, "landmarks_xy": torch.from_numpy(lm).float(),
              "png_face_mask": torch.from_numpy(rm.face_mask.astype(np.float32)),
              "png_sep_background": torch.from_numpy(rm.background.astype(np.float32)),
              "png_sep_face": torch.from_numpy(rm.face.astype(np.float32)),
              "png_sep_lip": torch.from_numpy(rm.lip.astype(np.float32)),
              "face_tokens": cond, "face_tokens_uncond": uncond}
        for k, (full, face, lip) in enumerate(levels):
            mf.update({f"full_mask_level{k}": full, f"face_mask_level{k}": face, f"lip_mask_level{k}": lip})
        _save(mf, root / case["masks_and_face_case"]["file"])
        case["masks_and_face_case"].update(given_face_box_xyxy=list(face_box), given_lip_box_xyxy=list(lip_box),
                                           tensors=_shapes(mf))

        # audio
        wav_name = case["audio_case"]["wav"].split()[0]
        write_wav(root / wav_name, spec["seconds"], spec["seed"])
        from emo_stream.families.hallo.parity import read_wav_pcm16

        samples = read_wav_pcm16(root / wav_name)
        normed = haudio.normalize(samples)
        padded, seq_len = haudio.pad_to_clips(normed, spec["fps"], spec["clip_length"])
        feats = haudio.layer_features(wav2vec2, padded, seq_len)
        wins = haudio.windows(feats, 2)
        tokens = model.audio_tokens(wins[: spec["clip_length"]])
        au = {"waveform": torch.from_numpy(samples), "feature_extractor_out": torch.from_numpy(normed),
              "wav2vec_hidden_states": feats, "windows": wins, "audio_tokens_clip0": tokens}
        _save(au, root / case["audio_case"]["file"])
        case["audio_case"].update(tensors=_shapes(au), n_clips=seq_len // spec["clip_length"],
                                  audio_length_frames_unpadded=math.ceil(len(samples) / 16000 * spec["fps"]))

        # one denoiser call and the guidance pair
        lat, f = (img_h // 8, img_w // 8), spec["clip_length"]
        ref = torch.randn(1 + spec["motion_frames"], 4, *lat, generator=gen)
        x = torch.randn(1, 4, f, *lat, generator=gen)
        t = torch.tensor([spec["timestep"]])
        clip = ClipInputs(ref_latents=ref, face_tokens=cond, uncond_face_tokens=uncond, audio_tokens=tokens,
                          masks=[tuple(m for m in lv) for lv in levels],
                          face_feature=model.face_feature(rm.face_region(), f))
        model.prepare_reference(clip, guided=False)
        pred = model.denoise(x, t, clip, guided=False)
        model.config.bank_dtype = "float32"
        model.prepare_reference(clip, guided=False)
        pred32 = model.denoise(x, t, clip, guided=False)
        model.config.bank_dtype = "float16"
        model.prepare_reference(clip, guided=True)
        unc, con = model.denoise(x, t, clip, guided=True).chunk(2)
        dn = {"ref_latents": ref, "latents": x, "timestep": t, "face_locator_feature": clip.face_feature,
              "pred": pred, "pred_bank_fp32": pred32, "cfg_pred_uncond": unc, "cfg_pred_cond": con}
        _save(dn, root / case["denoiser_single_case"]["file"])
        case["denoiser_single_case"]["tensors"] = _shapes(dn)

        # the guided loop
        init = torch.randn(1, 4, f, *lat, generator=torch.Generator().manual_seed(spec["seed"] + 100))
        seen: dict[str, torch.Tensor] = {}

        def record(i, _t, out, unc, con):
            seen.update({f"step{i}_model_output": out, f"step{i}_pred_uncond": unc, f"step{i}_pred_cond": con})

        final = model.sample_clip(init * model.scheduler.init_noise_sigma, clip, steps=spec["steps"],
                                  guidance=spec["guidance"], callback=record)
        lp = {"initial_latents": init, "timesteps": model.scheduler.timesteps.clone(), "final_latents": final, **seen}
        _save(lp, root / case["cfg_loop_case"]["file"])
        case["cfg_loop_case"].update(timesteps=[int(v) for v in model.scheduler.timesteps], tensors=_shapes(lp))
    (root / "case.json").write_text(json.dumps(case, indent=1))
    return root
