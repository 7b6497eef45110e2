"""Full-size structure check (not in CI): build the sd15 preset, load a full-size SD1.5-shaped UNet state dict
into both the ReferenceNet and the backbone through the real init path (a diffusers unet/ folder), verify zero
missing/unexpected base keys and identical weights, and print parameter counts per part as JSON.

    python bench/check_sd15.py [--dtype float16] [--out bench/results/sd15-params.json]

With real SD1.5 weights instead of random ones: --sd15 /path/to/stable-diffusion-v1-5 (needs unet/).
fp16 halves the memory (~6 GiB instead of ~12 GiB); the structure check is the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import device_name, emit_json, peak_rss_bytes  # bench/; puts the repo on sys.path
from emo_stream.blocks.weights import find_weights, read_state_dict
from emo_stream.families.emo.config import load_config
from emo_stream.families.emo.init_weights import load_unet2d
from emo_stream.families.emo.model import EmoModel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--sd15", default=None, help="a real diffusers SD1.5 folder (default: a random one made here)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()

    # a script, not library code: building in half precision keeps the check within a shared 24 GiB machine
    torch.set_default_dtype(getattr(torch, args.dtype))
    cfg = load_config("sd15")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.sd15) if args.sd15 else Path(tmp)
        if not args.sd15:
            from diffusers import UNet2DConditionModel
            from safetensors.torch import save_file

            torch.manual_seed(0)
            unet = UNet2DConditionModel(**cfg.unet)
            (folder / "unet").mkdir()
            save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
                      str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
            del unet
        path = find_weights(folder / "unet", "UNet")
        unet2d = load_unet2d(folder, cfg)       # strict: raises on any missing/unexpected key or shape
        model = EmoModel.build(cfg, unet2d=unet2d)
        del unet2d
        sd = read_state_dict(path)

    ref = model.reference_net.unet.state_dict()
    bb = {k: v for k, v in model.backbone.unet.state_dict().items()
          if ".motion_modules." not in k and ".processor." not in k}
    report = {
        "device": device_name(),
        "preset": "sd15",
        "dtype": args.dtype,
        "sd15_unet_keys": len(sd),
        "reference_net": {"missing": sorted(set(sd) - set(ref)), "unexpected": sorted(set(ref) - set(sd)),
                          "identical_weights": all(torch.equal(ref[k], sd[k]) for k in sd if k in ref)},
        "backbone_2d": {"missing": sorted(set(sd) - set(bb)), "unexpected": sorted(set(bb) - set(sd)),
                        "identical_weights": all(torch.equal(bb[k], sd[k]) for k in sd if k in bb)},
        "parameters": model.parameter_counts(),
        "parameters_backbone_2d": sum(v.numel() for v in bb.values()),
        "build_seconds": round(time.time() - t0, 1),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
    }
    emit_json(report, args.out)
    ok = not any(report[p][k] for p in ("reference_net", "backbone_2d") for k in ("missing", "unexpected"))
    same = report["reference_net"]["identical_weights"] and report["backbone_2d"]["identical_weights"]
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
