"""Counted FLOPs per generated frame at 512x512, for every model family and mode (live / offline).

    python bench/flops.py [--size 512] [--json bench/results/flops.json]

Counts with torch.utils.flop_counter.FlopCounterMode on the meta device: the models are built without
weights and nothing is computed, so it takes seconds on a CPU, and the numbers are the arithmetic a GPU does
(matrix products, convolutions, attention; elementwise work is not counted).

Each record: family, variant, mode, steps, guidance, segment_frames, and per generated frame (TFLOP):
    parts.reference        ReferenceNet on the portrait: once per avatar, shown amortised over 60 s of video
    parts.motion           motion-frame features, once per segment, per frame of the segment
    parts.audio            audio encoder + projection, once per segment (left context included)
    parts.condition        face locator, speed encoder (once per segment)
    parts.denoise          steps x one backbone pass
    parts.guidance         the unconditional branch of classifier-free guidance (steps x one more pass)
    parts.decode           latent decoder (TAESD live, SD VAE offline)
    tflop_per_frame_per_step   one backbone pass (the guidance-free step)
    tflop_per_frame_total      the sum of the parts
The live default carries "default": true and is checked against the budget of docs/DESIGN (guidance-free,
<= 1.0 per step, <= 4.2 in all).

Families: a counter per architecture key of emo_stream.models.families (COUNTERS below); a registered
family without a counter is listed under "missing".
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import emit_json  # bench/; puts the repo on sys.path

BUDGET = {"per_step": 1.0, "total": 4.2}
AMORTISE_SECONDS = 60  # the reference is encoded once per avatar: shown per frame over a minute of video
FPS = 25
META = torch.device("meta")


def tflop(fn: Callable[[], Any], by_module: bool = False) -> tuple[float, dict]:
    """(TFLOP counted while running fn, per-module counts if asked)."""
    counter = FlopCounterMode(display=False, depth=None if by_module else 1)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e12, (counter.get_flop_counts() if by_module else {})


def backbone_breakdown(counts: dict, frames: int) -> dict[str, float]:
    """Where one backbone pass goes, TFLOP per frame, by kind of layer (non-overlapping module names)."""
    out: Counter = Counter()
    prefix = r"Backbone\.unet\."
    for name, ops in counts.items():
        v = sum(ops.values()) / 1e12 / frames
        if re.fullmatch(prefix + r"(down_blocks\.\d|up_blocks\.\d|mid_block)\.resnets\.\d", name):
            out["resnets"] += v
        elif re.fullmatch(prefix + r".*\.(downsamplers|upsamplers)\.\d", name):
            out["down/upsamplers"] += v
        elif re.fullmatch(prefix + r"(conv_in|conv_out|time_embedding)", name):
            out["conv_in/out, time"] += v
        elif re.fullmatch(prefix + r".*\.attentions\.\d\.transformer_blocks\.\d\.attn1", name):
            out["spatial self-attention + reference-attention"] += v
        elif re.fullmatch(prefix + r".*\.attentions\.\d\.transformer_blocks\.\d\.attn2", name):
            out["audio cross-attention"] += v
        elif re.fullmatch(prefix + r".*\.attentions\.\d\.transformer_blocks\.\d\.ff", name):
            out["spatial feed-forward"] += v
        elif re.fullmatch(prefix + r".*\.attentions\.\d\.(proj_in|proj_out)", name):
            out["spatial proj in/out"] += v
        elif re.fullmatch(prefix + r".*\.motion_modules\.\d", name):
            out["temporal modules (incl. speed)"] += v
    for name, ops in counts.items():  # the speed cross-attention, inside the temporal modules
        if re.fullmatch(prefix + r".*\.motion_modules\.\d\.transformer_blocks\.\d\.attn2\.processor\.attn", name):
            out["  of which speed cross-attention"] += sum(ops.values()) / 1e12 / frames
    return {k: round(v, 4) for k, v in out.items()}


# ---- EMO ---------------------------------------------------------------------------------------------
def count_emo(preset: str, mode: str, steps: int | None = None, guidance: float | None = None,
              decoder: str | None = None, segment: int | None = None, size: int = 512, shortcuts: bool = True,
              variant: str | None = None, breakdown: bool = False) -> dict[str, Any]:
    """One EMO configuration, counted the way EmoBackend runs it (motion frames through the ReferenceNet once
    per segment, audio once per segment, `steps` backbone passes, guidance doubling each, then decode)."""
    from emo_stream.models.config import load_config
    from emo_stream.models.emo_model import EmoModel

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
        "exact_shortcuts": shortcuts,
        "tflop_per_frame_per_step": round(per_step, 4),
        "tflop_per_frame_total": round(sum(parts.values()), 4),
        "parts": {k: round(v, 4) for k, v in parts.items()},
        "reference_tflop_per_avatar": round(ref_t, 4),
    }
    if breakdown:
        rec["per_step_breakdown"] = backbone_breakdown(counts, f)
    return rec


def emo_records(size: int) -> list[dict[str, Any]]:
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


COUNTERS: dict[str, Callable[[int], list[dict[str, Any]]]] = {"emo": emo_records}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the result here (e.g. bench/results/flops.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.monotonic()
    from emo_stream.models.families import FAMILIES

    records, missing = [], []
    for name in sorted(set(FAMILIES) | set(COUNTERS)):
        if name in COUNTERS:
            records += COUNTERS[name](args.size)
        else:
            missing.append(f"{name}: registered family without a FLOP counter in bench/flops.py")
    default = [r for r in records if r.get("default")]
    check = None
    if default:
        d = default[0]
        check = {"guidance_free": d["guidance"] == 1.0,
                 "per_step": d["tflop_per_frame_per_step"], "per_step_max": BUDGET["per_step"],
                 "total": d["tflop_per_frame_total"], "total_max": BUDGET["total"]}
        check["within"] = bool(check["guidance_free"] and check["per_step"] <= BUDGET["per_step"]
                               and check["total"] <= BUDGET["total"])
    emit_json({"bench": "flops", "device": "meta (counted with torch.utils.flop_counter, nothing computed)",
               "torch": torch.__version__, "size": args.size, "unit": "TFLOP per generated frame",
               "records": records, "live_default_budget": check, "missing": missing,
               "seconds": round(time.monotonic() - t0, 1)}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
