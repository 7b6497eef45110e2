"""EchoMimic v1's FLOP records (bench/flops.py): counted the way EchoMimicBackend runs it, on the meta device."""

from __future__ import annotations

from typing import Any

import torch

from emo_stream.blocks.flops import AMORTISE_SECONDS, FPS, META, round4, sd15_decoders, tflop, totals

def count_echomimic(weights: str, mode: str, size: int = 512) -> dict[str, Any]:
    """EchoMimic v1 as emo_stream's EchoMimic backend runs it: offline, 12-frame context windows overlapping
    by 3 (9 new frames per window); live, 8-frame segments denoised with the 4 held frames before them
    (12 frames per call). acc weights: 6 steps without guidance; normal: 30 steps, guidance 2.5 (the
    unconditional branch drops audio, face and reference). Audio: whisper-tiny over a 30 s mel window."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from emo_stream.families.echomimic.config import EchoMimicConfig
    from emo_stream.families.echomimic.model import EchoMimicModel

    vae_cfg, taesd_cfg = sd15_decoders()
    cfg = EchoMimicConfig(weights_set=weights, vae=vae_cfg)
    steps, guidance = (6, 1.0) if weights == "acc" else (30, 2.5)
    decoder = "taesd" if mode == "live" else "vae"
    window, new = (12, 9) if mode == "offline" else (12, 8)
    model = EchoMimicModel.build(cfg, empty=True).eval().to(META)
    h = size // 8
    holder: dict[str, Any] = {}
    ref_t, _ = tflop(lambda: holder.__setitem__("bank", model.encode_reference(torch.zeros(1, 4, h, h, device=META))))
    face_t, _ = tflop(lambda: holder.__setitem__("face", model.face_feature(torch.zeros(1, 1, size, size, device=META))))
    try:
        mel = torch.zeros(cfg.whisper["n_mels"], 3000, device=META)
        audio_t, _ = tflop(lambda: model.whisper.features_from_mel(mel))
        audio_note = "whisper-tiny encoder over one 30 s mel window, once per segment/window"
    except Exception as exc:  # noqa: BLE001 (the audio encoder's share is small; say so rather than fail)
        audio_t, audio_note = 0.0, f"not counted ({type(exc).__name__})"
    tokens = torch.zeros(1, window, cfg.audio_tokens_per_frame, cfg.audio_dim, device=META)
    x = torch.zeros(1, 4, window, h, h, device=META)
    t = torch.tensor(500, device=META)
    step_t, _ = tflop(lambda: model.denoise(x, t, tokens, holder["face"], None, holder["bank"]))
    # the unconditional branch drops the reference: plain self-attention, as with no bank
    uncond_t, _ = tflop(lambda: model.denoise(x, t, torch.zeros_like(tokens), None, None, None))
    dec = AutoencoderTiny(**taesd_cfg) if decoder == "taesd" else AutoencoderKL(**vae_cfg)
    dec = dec.to(META) if decoder == "taesd" else model.vae
    dec_t, _ = tflop(lambda: dec.decode(torch.zeros(1, 4, h, h, device=META)))
    per_step = step_t / new
    parts = {"reference": ref_t / (AMORTISE_SECONDS * FPS), "motion": 0.0, "audio": audio_t / new,
             "condition": face_t / (AMORTISE_SECONDS * FPS), "denoise": steps * per_step,
             "guidance": steps * uncond_t / new if guidance != 1.0 else 0.0, "decode": dec_t}
    return {"family": "echomimic-v1", "variant": f"EchoMimic v1 {weights} weights, {mode}", "mode": mode,
            "steps": steps, "guidance": guidance, "decoder": decoder, "segment_frames": new,
            "frames_per_denoiser_call": window, "size": size, **totals(per_step, parts),
            "reference_tflop_per_avatar": round4(ref_t),
            "audio_counted": audio_note}


def records(size: int) -> list[dict[str, Any]]:
    return [count_echomimic("normal", "offline", size), count_echomimic("acc", "offline", size),
            count_echomimic("acc", "live", size)]
