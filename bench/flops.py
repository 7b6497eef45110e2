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

Families: every family of emo_stream.registry with a `flops` entry (its folder's flops.py); a registered family
with a model (an architecture) but no counter is listed under "missing".
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from _common import emit_json  # bench/; puts the repo on sys.path

BUDGET = {"per_step": 1.0, "total": 4.2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the result here (e.g. bench/results/flops.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.monotonic()
    from emo_stream.registry import families

    records, missing = [], []
    for family in families():
        if family.flops:
            try:
                records += family.flop_records(args.size)
            except Exception as exc:  # noqa: BLE001 (one family's counter must not hide the others)
                logging.exception("counting %s failed", family.name)
                missing.append(f"{family.name}: counter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        elif family.architecture:   # a model without a counter (the preview has no model to count)
            missing.append(f"{family.name}: registered family without a FLOP counter (flops= in its FAMILY)")
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
