"""Hallo's FLOP records (bench/flops.py): one offline clip as HalloBackend samples it, on the meta device."""

from __future__ import annotations

from typing import Any

import torch

from emo_stream.blocks.flops import META, sd15_decoders, tflop, totals

def count_hallo(size: int = 512) -> dict[str, Any]:
    """Hallo offline, as emo_stream.families.hallo samples a clip (bench/hallo_speed.py): per 16-frame clip the
    ReferenceNet on the reference + 2 motion frames (twice with guidance), 40 guided DDIM steps, SD VAE.
    The wav2vec2 audio encoder is not counted (its share is ~0.002 TFLOP per frame, as in EMO's)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from emo_stream.families.hallo.config import HalloConfig
    from emo_stream.families.hallo.model import ClipInputs, HalloModel

    vae_cfg, _ = sd15_decoders()
    cfg = HalloConfig(image_size=size)
    with init_empty_weights(include_buffers=False):
        model = HalloModel(cfg, None, vae=AutoencoderKL(**vae_cfg))
    model = model.eval().to(META)
    lat, f, nm = size // 8, cfg.clip_length, cfg.motion_frames
    tok, adim = cfg.imageproj["cross_attention_dim"], cfg.audioproj["output_dim"]
    z = lambda *shape: torch.zeros(*shape, device=META)  # noqa: E731
    clip = ClipInputs(ref_latents=z(1 + nm, 4, lat, lat), face_tokens=z(1, 4, tok), uncond_face_tokens=z(1, 4, tok),
                      audio_tokens=z(1, f, cfg.audioproj["context_tokens"], adim),
                      masks=[tuple(z(1, (lat // 2 ** k) ** 2) for _ in range(3))
                             for k in range(len(cfg.unet["block_out_channels"]))],
                      face_feature=z(1, cfg.face_locator["conditioning_embedding_channels"], f, lat, lat))
    guided = cfg.guidance > 1.0
    ref_t, _ = tflop(lambda: model.prepare_reference(clip, guided))
    x = z(1, 4, f, lat, lat)
    t = torch.tensor(500, device=META)
    both_t, _ = tflop(lambda: model.denoise(x, t, clip, guided))
    one_t, _ = tflop(lambda: model.denoise(x, t, clip, False))
    dec_t, _ = tflop(lambda: model.vae.decode(z(1, 4, lat, lat)))
    per_step = one_t / f
    parts = {"reference": ref_t / f, "motion": 0.0, "audio": 0.0, "condition": 0.0, "denoise": cfg.steps * per_step,
             "guidance": cfg.steps * (both_t - one_t) / f if guided else 0.0, "decode": dec_t}
    return {"family": "hallo", "variant": "Hallo, offline", "mode": "offline", "steps": cfg.steps,
            "guidance": cfg.guidance, "decoder": "vae", "segment_frames": f, "motion_frames": nm, "size": size,
            **totals(per_step, parts),
            "notes": "reference = the ReferenceNet on reference + motion frames, once per clip (Hallo re-runs it); "
                     "audio (wav2vec2) not counted; no live mode in this family"}



def records(size: int) -> list[dict[str, Any]]:
    return [count_hallo(size)]
