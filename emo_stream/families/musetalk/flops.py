"""MuseTalk 1.5's FLOP records (bench/flops.py), counted on the meta device the way its live path runs: per
frame one UNet call at t = 0 on the 256x256 face crop's latents (32 x 32, masked + reference: 8 channels) with
the frame's whisper prompt (10 x 5 tokens of 384), then one decode of the 4-channel output: the SD VAE (MuseTalk's
own) or TAESD (the fast live option). No sampling loop, no guidance. Once per avatar (not per frame): the VAE
encodes of the crops (masked and whole); per live segment: whisper-tiny over its 30 s segment (1500 positions,
zero-padded as MuseTalk pads a file), counted as audio per frame at the default 5-frame segment.
The crop's paste-back into the full frame (face-parsing mask, blending) is elementwise and not counted."""

from __future__ import annotations

from typing import Any

import torch

from emo_stream.blocks.flops import AMORTISE_SECONDS, FPS, META, round4, sd15_decoders, tflop, totals

# musetalkV15/musetalk.json of the published download (TMElyralab/MuseTalk): SD1.5's UNet with 8 input channels
# and whisper-tiny's 384-wide states as the cross-attention context
UNET = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 384,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 8, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
CROP = 256
PROMPT_TOKENS = 50   # 2 whisper steps per frame x (2 + 1 + 2) frames x 5 layers
# whisper/config.json of openai/whisper-tiny (the encoder's shape)
WHISPER = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
           "num_mel_bins": 80, "max_source_positions": 1500, "decoder_layers": 4, "decoder_attention_heads": 6,
           "decoder_ffn_dim": 1536, "vocab_size": 51865}
LIVE_SEGMENT_FRAMES = 5   # MuseTalkBackend's default: one whisper call per 5 frames


def whisper_tflop() -> float:
    """One whisper-tiny encoder call on a 30 s segment (3000 mel frames, 1500 positions)."""
    from emo_stream.families.musetalk.audio import encoder_states
    from emo_stream.families.musetalk.loader import build_whisper_encoder

    with torch.device(META):
        enc = build_whisper_encoder(WHISPER).eval()
    return tflop(lambda: encoder_states(enc, torch.zeros(1, 80, 3000, device=META)))[0]


def count_musetalk(decoder: str, crop: int = CROP) -> dict[str, Any]:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    vae_cfg, taesd_cfg = sd15_decoders()
    with torch.device(META):
        unet = UNet2DConditionModel(**UNET).eval()
        vae = AutoencoderKL(**vae_cfg).eval()
        dec = AutoencoderTiny(**taesd_cfg).eval() if decoder == "taesd" else vae
    h = crop // 8
    lat = torch.zeros(1, 8, h, h, device=META)
    prompt = torch.zeros(1, PROMPT_TOKENS, 384, device=META)
    t = torch.zeros((), dtype=torch.long, device=META)
    step_t, _ = tflop(lambda: unet(lat, t, encoder_hidden_states=prompt))
    dec_t, _ = tflop(lambda: dec.decode(torch.zeros(1, 4, h, h, device=META)))
    enc_t, _ = tflop(lambda: vae.encode(torch.zeros(2, 3, crop, crop, device=META)))   # masked + whole crop
    parts = {"reference": enc_t / (AMORTISE_SECONDS * FPS), "motion": 0.0,
             "audio": whisper_tflop() / LIVE_SEGMENT_FRAMES, "condition": 0.0,
             "denoise": step_t, "guidance": 0.0, "decode": dec_t}
    return {"family": "musetalk", "variant": f"MuseTalk 1.5 live, {'TAESD' if decoder == 'taesd' else 'SD VAE'} "
            f"decode", "mode": "live", "steps": 1, "guidance": 1.0, "decoder": decoder, "segment_frames": 1,
            "size": crop, **totals(step_t, parts), "reference_tflop_per_avatar": round4(enc_t),
            "notes": "one UNet call per frame at t=0 on the 256x256 face crop; audio: one whisper-tiny call on its "
                     f"30 s segment per {LIVE_SEGMENT_FRAMES}-frame live segment; the paste-back into the full "
                     "frame is elementwise"}


def records(size: int = 512) -> list[dict[str, Any]]:
    """MuseTalk works on 256x256 face crops whatever the output size."""
    return [count_musetalk("vae"), count_musetalk("taesd")]
