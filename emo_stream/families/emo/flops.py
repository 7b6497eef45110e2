"""EMO's FLOP records (bench/flops.py): counted the way EmoBackend runs it, on the meta device."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import torch

from emo_stream.blocks.flops import AMORTISE_SECONDS, FPS, META, round4, tflop, totals

# kind of layer -> module-name pattern under Backbone.unet (non-overlapping; first match wins)
_LAYER_KINDS = (
    ("resnets", r"(down_blocks\.\d|up_blocks\.\d|mid_block)\.resnets\.\d"),
    ("down/upsamplers", r".*\.(downsamplers|upsamplers)\.\d"),
    ("conv_in/out, time", r"(conv_in|conv_out|time_embedding)"),
    ("spatial self-attention + reference-attention", r".*\.attentions\.\d\.transformer_blocks\.\d\.attn1"),
    ("audio cross-attention", r".*\.attentions\.\d\.transformer_blocks\.\d\.attn2"),
    ("spatial feed-forward", r".*\.attentions\.\d\.transformer_blocks\.\d\.ff"),
    ("spatial proj in/out", r".*\.attentions\.\d\.(proj_in|proj_out)"),
    ("temporal modules (incl. speed)", r".*\.motion_modules\.\d"),
)
# the speed cross-attention, inside the temporal modules (so counted on top of the kinds above)
_SPEED_XATTN = r".*\.motion_modules\.\d\.transformer_blocks\.\d\.attn2\.processor\.attn"


def backbone_breakdown(counts: dict, frames: int) -> dict[str, float]:
    """Where one backbone pass goes, TFLOP per frame, by kind of layer (non-overlapping module names)."""
    out: Counter = Counter()
    speed: float | None = None
    prefix = r"Backbone\.unet\."
    for name, ops in counts.items():
        v = sum(ops.values()) / 1e12 / frames
        kind = next((k for k, pat in _LAYER_KINDS if re.fullmatch(prefix + pat, name)), None)
        if kind is not None:
            out[kind] += v
        if re.fullmatch(prefix + _SPEED_XATTN, name):
            speed = (speed or 0.0) + v
    if speed is not None:
        out["  of which speed cross-attention"] += speed
    return {k: round4(v) for k, v in out.items()}


def count_emo(preset: str, mode: str, steps: int | None = None, guidance: float | None = None,
              decoder: str | None = None, segment: int | None = None, size: int = 512, shortcuts: bool = True,
              variant: str | None = None, breakdown: bool = False) -> dict[str, Any]:
    """One EMO configuration, counted the way EmoBackend runs it (motion frames through the ReferenceNet once
    per segment, audio once per segment, `steps` backbone passes, guidance doubling each, then decode)."""
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.emo.model import EmoModel

    cfg = load_config(preset)
    s = cfg.sampling
    steps = int(steps or s.steps)
    guidance = float(s.guidance if guidance is None else guidance)
    decoder = decoder or s.decoder
    f = int(segment or (min(8, cfg.clip_frames) if mode == "live" else cfg.clip_frames))
    n = cfg.motion_frames
    model = EmoModel.build(cfg, empty=True).eval().to(META)
    model.set_shortcuts(shortcuts)
    h = size // cfg.latent_factor
    lat = torch.zeros(1, cfg.latent_channels, h, h, device=META)
    holder: dict[str, Any] = {}

    def reference():
        holder["ref"] = model.encode_reference(lat, project=shortcuts)

    ref_t, _ = tflop(reference)
    motion_t, _ = tflop(lambda: holder.__setitem__(
        "motion", model.encode_motion(torch.zeros(1, cfg.latent_channels, n, h, h, device=META))))
    spf = 16000 // FPS
    left = int(cfg.audio.left_context_seconds * 16000)
    audio = np.zeros(left + (f + cfg.audio.window) * spf, np.float32)
    audio_t, _ = tflop(lambda: holder.__setitem__("feats", model.audio_encoder.encode(audio, left, f, FPS)))
    feats = holder["feats"][None]
    mask = torch.zeros(1, 1, size, size, device=META)
    proj_t, _ = tflop(lambda: model.audio_proj(feats.to(META)))

    def condition():
        holder["cond"] = model.condition(holder["ref"], feats, mask, None, holder["motion"], cache=shortcuts)

    cond_t, _ = tflop(condition)
    cond_t -= proj_t  # condition() runs the audio projection too: counted under audio
    x = torch.zeros(1, cfg.latent_channels, f, h, h, device=META)
    step_t, counts = tflop(lambda: model.predict_noise(x, torch.tensor([500], device=META), holder["cond"]),
                           by_module=breakdown)
    if shortcuts:  # the reference K/V are in the avatar; later steps reuse the segment's audio/speed K/V
        step_t, _ = tflop(lambda: model.predict_noise(x, torch.tensor([500], device=META), holder["cond"]))
    dec_t, _ = tflop(lambda: model.decode_latents(torch.zeros(1, cfg.latent_channels, h, h, device=META), decoder))

    per_step = step_t / f
    cfg_on = guidance != 1.0
    parts = {
        "reference": ref_t / (AMORTISE_SECONDS * FPS),
        "motion": motion_t / f,
        "audio": (audio_t + proj_t) / f,
        "condition": cond_t / f,
        "denoise": steps * per_step,
        "guidance": steps * per_step if cfg_on else 0.0,
        "decode": dec_t,
    }
    rec: dict[str, Any] = {
        "family": "emo", "variant": variant or preset, "preset": preset, "mode": mode, "steps": steps,
        "guidance": guidance, "decoder": decoder, "segment_frames": f, "motion_frames": n, "size": size,
        "exact_shortcuts": shortcuts, **totals(per_step, parts),
        "reference_tflop_per_avatar": round4(ref_t),
    }
    if breakdown:
        rec["per_step_breakdown"] = backbone_breakdown(counts, f)
    return rec


def records(size: int) -> list[dict[str, Any]]:
    return [
        # offline quality path: unchanged (40 DDIM steps, guidance 3.5, SD VAE, 12-frame clips)
        count_emo("sd15", "offline", size=size, variant="sd15 offline (quality)"),
        # the live path before this work: the teacher at 4 guided steps, no shortcuts
        count_emo("sd15", "live", steps=4, decoder="taesd", size=size, shortcuts=False, breakdown=True,
                  variant="sd15 teacher, 4 guided steps, no shortcuts (before)"),
        # the teacher guidance-distilled, with the exact shortcuts: still above budget per step
        count_emo("sd15", "live", steps=4, guidance=1.0, decoder="taesd", size=size, breakdown=True,
                  variant="sd15 guidance-distilled, 4 steps, shortcuts"),
        # the live default: the block-pruned distilled student
        {**count_emo("sd15_live", "live", size=size, breakdown=True,
                     variant="sd15_live student (distilled, guidance-free), shortcuts"), "default": True},
    ]
