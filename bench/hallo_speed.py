"""Seconds per video second of Hallo's sampling at full size, random weights (the cost does not depend on them):
one 16-frame clip = ReferenceNet once + `steps` guided denoiser calls + 16 VAE decodes + 3 VAE encodes.

    python bench/hallo_speed.py --device cuda --steps 40            # GPU: the figure for docs/model.md
    python bench/hallo_speed.py --device cpu --golden ../shared/golden/hallo --steps 2   # CPU smoke run

Prints JSON naming the device. With --model PATH the real weights are used instead (a Hallo download).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(args):
    from diffusers import AutoencoderKL

    from emo_stream.families.hallo.config import HalloConfig
    from emo_stream.families.hallo.model import HalloModel

    if args.model:
        from emo_stream.families.hallo.loader import load_hallo
        return load_hallo(args.model)
    if args.golden:
        case = json.loads((Path(args.golden) / "case.json").read_text())
        cfg = HalloConfig.from_case(case)
        vae = AutoencoderKL(block_out_channels=[32] * 4, layers_per_block=1, norm_num_groups=32,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    else:
        cfg = HalloConfig()
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    return HalloModel(cfg, None, vae=vae)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float16 (CUDA default) / bfloat16 / float32")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--clips", type=int, default=2, help="timed clips (after one warm-up clip)")
    p.add_argument("--golden", default=None, help="use a golden set's shrunken sizes (CPU smoke test)")
    p.add_argument("--model", default=None, help="a Hallo download folder (real weights)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    from emo_stream.families.hallo.model import ClipInputs

    model = build(args).to(dev, dtype).eval()
    cfg = model.config
    size = cfg.image_size
    lat, f, nm = size // 8, cfg.clip_length, cfg.motion_frames
    n_levels = len(cfg.unet["block_out_channels"])
    tok = cfg.imageproj["cross_attention_dim"]
    adim = cfg.audioproj["output_dim"]

    def one_clip() -> None:
        ref = model.encode_images(torch.zeros(1 + nm, 3, size, size, device=dev, dtype=dtype))
        clip = ClipInputs(ref_latents=ref, face_tokens=torch.zeros(1, 4, tok, device=dev, dtype=dtype),
                          uncond_face_tokens=torch.zeros(1, 4, tok, device=dev, dtype=dtype),
                          audio_tokens=torch.zeros(1, f, cfg.audioproj["context_tokens"], adim, device=dev, dtype=dtype),
                          masks=[tuple(torch.ones(1, (lat // 2 ** k) ** 2, device=dev, dtype=dtype) for _ in range(3))
                                 for k in range(n_levels)],
                          face_feature=torch.zeros(1, cfg.face_locator["conditioning_embedding_channels"], f, lat, lat,
                                                   device=dev, dtype=dtype))
        x = torch.randn(1, 4, f, lat, lat, device=dev, dtype=dtype)
        latents = model.sample_clip(x, clip, steps=args.steps, guidance=cfg.guidance)
        model.decode_latents(latents[0].transpose(0, 1))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        one_clip()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.clips):
            one_clip()
        sync()
        per_clip = (time.perf_counter() - t0) / args.clips
    result = {"bench": "hallo_speed", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
              "weights": args.model or ("golden sizes, random" if args.golden else "full size, random"),
              "dtype": str(dtype).replace("torch.", ""), "size": size, "clip_frames": f, "steps": args.steps,
              "guidance": cfg.guidance, "seconds_per_clip": round(per_clip, 3),
              "seconds_per_video_second": round(per_clip * cfg.fps / f, 3),
              "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
