"""Make Hallo golden sets (the folder format of ../shared/golden/hallo) by running Hallo's own code.

Hallo is imported from a local checkout (github fudan-generative-vision/hallo, commit 8fd7c57); this file
holds none of its code. Run it in a venv with Hallo's pins, not in the product's environment:

    python3 -m venv /tmp/venv-hallo
    /tmp/venv-hallo/bin/pip install torch==2.13.0 diffusers==0.27.2 transformers==4.39.3 einops==0.8.0 \
        omegaconf safetensors "numpy<2" "huggingface_hub<0.26"
    /tmp/venv-hallo/bin/python tools/golden_hallo.py --hallo /tmp/hallo --out /tmp/golden-hallo-64-s1 \
        --size 64 --seed 1
    python -m server.cli parity /tmp/golden-hallo-64-s1          # our importer against it

What a set holds (random weights of the given shape, stored fp16 like net.pth; all compute fp32, 1 thread):
- weights/net.pth: Net.state_dict() with Hallo's five prefixes, loaded back strictly as scripts/inference.py
  does (the denoiser built with from_config -> training mode + gradient checkpointing, the ReferenceNet eval);
- masks_and_face.safetensors: face_region, face_embedding, full/face/lip level masks (random, /255 steps,
  one per UNet level at that level's latent size), face_tokens / face_tokens_uncond = Hallo's ImageProjModel;
- audio.safetensors: windows (random, the wav2vec window shape) and audio_tokens_clip0 = Hallo's AudioProjModel;
- denoiser_single.safetensors: one denoiser call (fp16 bank as ReferenceAttentionControl.update does, and an
  fp32-bank variant) and the guided [uncond, cond] call as FaceAnimatePipeline forms it;
- cfg_loop.safetensors: FaceAnimatePipeline.__call__ itself (a stand-in VAE returns the reference latents),
  every step's guided output and both halves, and the final latents.
The mask rules, wav2vec2 and the audio file are not part of these sets (they do not depend on the UNet's
size; the shared sets cover them): case.json has no masks_and_face_case / audio_case, so parity skips them.

--from-set DIR recomputes a set's reference outputs (denoiser_single, cfg_loop) with the same weights and
inputs in this environment, copying everything else: it tells a difference in our code from one between
torch builds.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

from _golden_common import StandInVae, git_commit, randomize, save, shapes   # tools/ is on sys.path when this runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hallo", required=True, help="checkout of github fudan-generative-vision/hallo")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--size", default="64", help="image size in pixels: N or HxW (latents are /8)")
    p.add_argument("--widths", default="32,32,32,32", help="block_out_channels")
    p.add_argument("--groups", type=int, default=32, help="norm_num_groups")
    p.add_argument("--head-dim", type=int, default=8, help="attention_head_dim (Hallo: heads)")
    p.add_argument("--cross-dim", type=int, default=32, help="cross_attention_dim (face tokens)")
    p.add_argument("--audio-dim", type=int, default=32, help="audio_attention_dim (audio tokens)")
    p.add_argument("--frames", type=int, default=8, help="clip_length")
    p.add_argument("--motion-frames", type=int, default=2)
    p.add_argument("--timestep", type=int, default=974, help="the single call's timestep")
    p.add_argument("--steps", type=int, default=3, help="guided DDIM steps of the loop")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0, help="weights, inputs and the loop's noise seed")
    p.add_argument("--from-set", help="recompute this set's outputs instead of making a new one")
    return p.parse_args(argv)


def import_hallo(path: str):
    """Hallo's modules from the checkout. Its motion_module imports xformers unconditionally; a CPU run never
    calls it, so an empty module stands in (after diffusers has checked for the real one)."""
    import diffusers  # noqa: F401  (its xformers probe must see the real state first)
    if "xformers" not in sys.modules:
        stub = types.ModuleType("xformers")
        stub.ops = types.ModuleType("xformers.ops")
        sys.modules["xformers"], sys.modules["xformers.ops"] = stub, stub.ops
    sys.path.insert(0, str(Path(path).resolve()))
    import hallo.animate.face_animate as fa
    import hallo.models.audio_proj as ap
    import hallo.models.face_locator as fl
    import hallo.models.image_proj as ip
    import hallo.models.mutual_self_attention as msa
    import hallo.models.unet_2d_condition as u2
    import hallo.models.unet_3d as u3
    return types.SimpleNamespace(FaceAnimatePipeline=fa.FaceAnimatePipeline, AudioProjModel=ap.AudioProjModel,
                                 FaceLocator=fl.FaceLocator, ImageProjModel=ip.ImageProjModel,
                                 ReferenceAttentionControl=msa.ReferenceAttentionControl,
                                 UNet2DConditionModel=u2.UNet2DConditionModel,
                                 UNet3DConditionModel=u3.UNet3DConditionModel)


def make_case(a) -> dict:
    h, w = (int(v) for v in (a.size.split("x") if "x" in a.size else (a.size, a.size)))
    widths = [int(v) for v in a.widths.split(",")]
    base = dict(sample_size=h // 8, in_channels=4, out_channels=4, center_input_sample=False,
                flip_sin_to_cos=True, freq_shift=0, block_out_channels=widths, layers_per_block=1,
                downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=a.groups,
                norm_eps=1e-5, cross_attention_dim=a.cross_dim, attention_head_dim=a.head_dim)
    return {
        "set": f"generated {h}x{w} widths {widths} seed {a.seed}",
        "model": "hallo",
        "dtype": "weights stored fp16, all compute float32 on CPU",
        "torch_threads": 1,
        "unet_2d_config": dict(base, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                               mid_block_type="UNetMidBlock2DCrossAttn",
                               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "unet_3d_config": dict(base, down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                               mid_block_type="UNetMidBlock3DCrossAttn",
                               up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3),
        "unet_additional_kwargs": {
            "use_inflated_groupnorm": True, "unet_use_cross_frame_attention": False,
            "unet_use_temporal_attention": False, "use_motion_module": True, "use_audio_module": True,
            "motion_module_resolutions": [1, 2, 4, 8], "motion_module_mid_block": True,
            "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
            "motion_module_kwargs": {"num_attention_heads": 8, "num_transformer_block": 1,
                                     "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                                     "temporal_position_encoding": True,
                                     "temporal_position_encoding_max_len": 32, "temporal_attention_dim_div": 1},
            "audio_attention_dim": a.audio_dim, "stack_enable_blocks_name": ["up", "down", "mid"],
            "stack_enable_blocks_depth": [0, 1, 2, 3]},
        "module_args": {
            "face_locator": {"conditioning_embedding_channels": widths[0], "conditioning_channels": 3,
                             "block_out_channels": [4, 8, 16, 16]},
            "imageproj": {"cross_attention_dim": a.cross_dim, "clip_embeddings_dim": 512,
                          "clip_extra_context_tokens": 4},
            "audioproj": {"seq_len": 5, "blocks": 2, "channels": 32, "intermediate_dim": 64,
                          "output_dim": a.audio_dim, "context_tokens": 32}},
        "noise_scheduler_kwargs": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
                                   "clip_sample": False, "steps_offset": 1, "prediction_type": "v_prediction",
                                   "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        "image_hw": [h, w],
    }


def build_net(H, case: dict):
    """Hallo's five modules as scripts/inference.py builds them (without from_pretrained's files)."""
    import torch
    ref = H.UNet2DConditionModel.from_config(dict(case["unet_2d_config"]))
    cfg3 = dict(case["unet_3d_config"], _class_name="UNet3DConditionModel")
    den = H.UNet3DConditionModel.from_config(cfg3, **case["unet_additional_kwargs"])
    ma = case["module_args"]
    net = torch.nn.Module()
    net.reference_unet, net.denoising_unet = ref, den
    net.face_locator = H.FaceLocator(**ma["face_locator"])
    net.imageproj = H.ImageProjModel(**ma["imageproj"])
    net.audioproj = H.AudioProjModel(**ma["audioproj"])
    return net


def load_like_inference(H, case: dict, net_pth: Path):
    """Fresh modules, net.pth loaded strictly (fp16 file -> fp32 modules), modes as inference.py leaves them."""
    import torch
    net = build_net(H, case)
    missing, unexpected = net.load_state_dict(torch.load(net_pth, map_location="cpu", weights_only=True))
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    net.requires_grad_(False)
    net.reference_unet.eval()          # from_pretrained -> eval; the denoiser stays in training mode
    net.reference_unet.enable_gradient_checkpointing()
    net.denoising_unet.enable_gradient_checkpointing()
    return net


def level_sizes(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """Latent size at each UNet level (stride-2 convs with padding 1: ceil halving)."""
    out, (y, x) = [], (h // 8, w // 8)
    for _ in range(n):
        out.append((y, x))
        y, x = (y + 1) // 2, (x + 1) // 2
    return out


def make_inputs(case: dict, a, gen, net) -> tuple[dict, dict]:
    import torch
    h, w = case["image_hw"]
    n_levels = len(case["unet_2d_config"]["block_out_channels"])
    mf = {}
    region = torch.zeros(3, h, w)
    region[:, h // 5: h - h // 6, w // 4: w - w // 5] = 1.0
    mf["face_region"] = region
    mf["face_embedding"] = torch.randn(1, 512, generator=gen) * 3
    for k, (y, x) in enumerate(level_sizes(h, w, n_levels)):
        for part in ("full", "face", "lip"):
            mf[f"{part}_mask_level{k}"] = torch.randint(0, 256, (1, y * x), generator=gen).float() / 255
    with torch.no_grad():
        mf["face_tokens"] = net.imageproj(mf["face_embedding"])
        mf["face_tokens_uncond"] = net.imageproj(torch.zeros_like(mf["face_embedding"]))
    ap = case["module_args"]["audioproj"]
    au = {"windows": torch.randn(a.frames, ap["seq_len"], ap["blocks"], ap["channels"], generator=gen)}
    with torch.no_grad():
        au["audio_tokens_clip0"] = net.audioproj(au["windows"][None])
    return mf, au


def masks_for(mf: dict, n_levels: int, frames: int):
    return {part: [mf[f"{part}_mask_level{k}"].repeat(frames, 1) for k in range(n_levels)]
            for part in ("full", "face", "lip")}


def denoiser_single(H, net, case: dict, mf: dict, au: dict, dn_in: dict) -> dict:
    """The single call (fp16 and fp32 bank) and the guided pair, with Hallo's reference control."""
    import torch
    frames = au["audio_tokens_clip0"].shape[1]
    n_levels = len(case["unet_3d_config"]["block_out_channels"])
    ref, den = net.reference_unet, net.denoising_unet
    t = dn_in["timestep"].long()
    masks = masks_for(mf, n_levels, frames)
    region = mf["face_region"][None, None].repeat(1, frames, 1, 1, 1).transpose(1, 2)   # (1, 3, f, H, W)
    out = {}
    with torch.no_grad():
        feat = net.face_locator(region)
        out["face_locator_feature"] = feat
        for key, dtype in (("pred", torch.float16), ("pred_bank_fp32", torch.float32)):
            writer = H.ReferenceAttentionControl(ref, do_classifier_free_guidance=False, mode="write",
                                                 batch_size=1, fusion_blocks="full")
            reader = H.ReferenceAttentionControl(den, do_classifier_free_guidance=False, mode="read",
                                                 batch_size=1, fusion_blocks="full")
            ref(dn_in["ref_latents"], torch.zeros_like(t), encoder_hidden_states=mf["face_tokens"],
                return_dict=False)
            reader.update(writer, dtype=dtype)
            out[key] = den(dn_in["latents"], t, encoder_hidden_states=mf["face_tokens"], mask_cond_fea=feat,
                           full_mask=masks["full"], face_mask=masks["face"], lip_mask=masks["lip"],
                           audio_embedding=au["audio_tokens_clip0"], motion_scale=[1.0, 1.0, 1.0],
                           return_dict=False)[0]
            reader.clear()
            writer.clear()
        # guided: as FaceAnimatePipeline forms its batch [uncond, cond]
        ehs = torch.cat([mf["face_tokens_uncond"], mf["face_tokens"]])
        writer = H.ReferenceAttentionControl(ref, do_classifier_free_guidance=True, mode="write", batch_size=1,
                                             fusion_blocks="full")
        reader = H.ReferenceAttentionControl(den, do_classifier_free_guidance=True, mode="read", batch_size=1,
                                             fusion_blocks="full")
        ref(dn_in["ref_latents"].repeat(2, 1, 1, 1), torch.zeros_like(t), encoder_hidden_states=ehs,
            return_dict=False)
        reader.update(writer)
        pair = den(torch.cat([dn_in["latents"]] * 2), t, encoder_hidden_states=ehs,
                   mask_cond_fea=torch.cat([torch.zeros_like(feat), feat]),
                   full_mask=[torch.cat([m] * 2) for m in masks["full"]],
                   face_mask=[torch.cat([m] * 2) for m in masks["face"]],
                   lip_mask=[torch.cat([m] * 2) for m in masks["lip"]],
                   audio_embedding=torch.cat([torch.zeros_like(au["audio_tokens_clip0"]), au["audio_tokens_clip0"]]),
                   motion_scale=[1.0, 1.0, 1.0], return_dict=False)[0]
        reader.clear()
        writer.clear()
    out["cfg_pred_uncond"], out["cfg_pred_cond"] = pair.chunk(2)
    return out


def cfg_loop(H, net, case: dict, mf: dict, au: dict, ref_latents, a) -> dict:
    """FaceAnimatePipeline.__call__ itself, recording what scheduler.step receives at each step."""
    import torch
    from diffusers import DDIMScheduler
    h, w = case["image_hw"]
    frames = au["audio_tokens_clip0"].shape[1]
    n_levels = len(case["unet_3d_config"]["block_out_channels"])
    scheduler = DDIMScheduler(**case["noise_scheduler_kwargs"])
    pipe = H.FaceAnimatePipeline(vae=StandInVae(ref_latents, (h, w)), reference_unet=net.reference_unet,
                                 denoising_unet=net.denoising_unet, face_locator=net.face_locator,
                                 scheduler=scheduler, image_proj=net.imageproj)
    pipe.set_progress_bar_config(disable=True)
    rec: dict = {}
    steps: list = []
    orig_prepare, orig_step = pipe.prepare_latents, scheduler.step

    def prepare(*args, **kwargs):
        lat = orig_prepare(*args, **kwargs)
        rec["initial_latents"] = lat.clone()
        return lat

    def step(model_output, t, latents, *args, **kwargs):
        out = orig_step(model_output, t, latents, *args, **kwargs)
        steps.append(model_output.clone())
        rec["final_latents"] = out[0].clone()
        return out

    halves: list = []
    handle = net.denoising_unet.register_forward_hook(lambda _m, _a, o: halves.append(o[0].clone()))
    pipe.prepare_latents, scheduler.step = prepare, step
    masks = masks_for(mf, n_levels, frames)
    try:
        with torch.no_grad():
            pipe(ref_image=torch.zeros(1, 1 + a.motion_frames, 3, h, w), face_emb=mf["face_embedding"],
                 audio_tensor=au["audio_tokens_clip0"], face_mask=mf["face_region"][None],
                 pixel_values_full_mask=masks["full"], pixel_values_face_mask=masks["face"],
                 pixel_values_lip_mask=masks["lip"], width=w, height=h, video_length=frames,
                 num_inference_steps=a.steps, guidance_scale=a.guidance, generator=torch.manual_seed(a.seed),
                 motion_scale=[1.0, 1.0, 1.0])
    finally:
        handle.remove()
    rec["timesteps"] = scheduler.timesteps.float()
    for i, (mo, both) in enumerate(zip(steps, halves)):
        rec[f"step{i}_model_output"] = mo
        rec[f"step{i}_pred_uncond"], rec[f"step{i}_pred_cond"] = both.chunk(2)
    return rec


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    torch.set_num_threads(1)
    out = Path(a.out)
    if out.exists():
        sys.exit(f"golden_hallo: {out} exists; pick a new folder")
    H = import_hallo(a.hallo)
    from safetensors.torch import load_file

    if a.from_set:
        src = Path(a.from_set)
        case = json.loads((src / "case.json").read_text())
        case.setdefault("image_hw", (case.get("masks_and_face_case") or {}).get("image_hw"))
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("denoiser_single.safetensors",
                                                                "cfg_loop.safetensors", "manifests"))
        net = load_like_inference(H, case, out / "weights" / "net.pth")
        mf = load_file(str(src / "masks_and_face.safetensors"))
        au = load_file(str(src / "audio.safetensors"))
        old = load_file(str(src / "denoiser_single.safetensors"))
        dn_in = {k: old[k] for k in ("ref_latents", "latents", "timestep")}
        lp_case = case["cfg_loop_case"]
        a.steps, a.guidance = int(lp_case["num_inference_steps"]), float(lp_case["guidance_scale"])
        a.seed = int(str(lp_case["generator"]).split("manual_seed(")[1].split(")")[0])
        a.motion_frames = dn_in["ref_latents"].shape[0] - 1
    else:
        case = make_case(a)
        h, w = case["image_hw"]
        gen = torch.Generator().manual_seed(a.seed)
        torch.manual_seed(a.seed)
        out.mkdir(parents=True)
        (out / "weights").mkdir()
        net = build_net(H, case)
        randomize(net, gen)
        torch.save({k: v.half() for k, v in net.state_dict().items()}, out / "weights" / "net.pth")
        net = load_like_inference(H, case, out / "weights" / "net.pth")
        mf, au = make_inputs(case, a, gen, net)
        dn_in = {"ref_latents": torch.randn(1 + a.motion_frames, 4, h // 8, w // 8, generator=gen),
                 "latents": torch.randn(1, 4, a.frames, h // 8, w // 8, generator=gen),
                 "timestep": torch.tensor([a.timestep])}
        save(out, "masks_and_face.safetensors", mf)
        save(out, "audio.safetensors", au)

    dn = dict(dn_in, **denoiser_single(H, net, case, mf, au, dn_in))
    lp = cfg_loop(H, net, case, mf, au, dn_in["ref_latents"], a)
    save(out, "denoiser_single.safetensors", dn)
    save(out, "cfg_loop.safetensors", lp)

    frames = au["audio_tokens_clip0"].shape[1]
    case["denoiser_single_case"] = {
        "file": "denoiser_single.safetensors", "timestep": int(dn_in["timestep"][0]), "clip_length": frames,
        "n_motion_frames": dn_in["ref_latents"].shape[0] - 1, "motion_scale": [1.0, 1.0, 1.0],
        "tensors": shapes(dn),
        "outputs": {"pred": "fp16 bank (ReferenceAttentionControl.update's default)",
                    "pred_bank_fp32": "bank kept float32",
                    "cfg_pred_uncond / cfg_pred_cond": "one guided call [uncond, cond] as FaceAnimatePipeline"}}
    case["cfg_loop_case"] = {
        "file": "cfg_loop.safetensors", "pipeline": "hallo.animate.face_animate.FaceAnimatePipeline",
        "num_inference_steps": a.steps, "guidance_scale": a.guidance, "eta": 0.0,
        "generator": f"torch.manual_seed({a.seed})", "tensors": shapes(lp),
        "ref_latents": "denoiser_single.safetensors:ref_latents (the stand-in VAE hands them over exactly)"}
    case["generator"] = {"tool": "tools/golden_hallo.py", "argv": sys.argv[1:], "hallo_commit": git_commit(a.hallo),
                         "torch": torch.__version__}
    case["files"] = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "case.json").write_text(json.dumps(case, indent=1))
    print(f"golden_hallo: wrote {out} (latents {tuple(dn['latents'].shape)}, levels "
          f"{[tuple(s) for s in level_sizes(*case['image_hw'], len(case['unet_2d_config']['block_out_channels']))]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
