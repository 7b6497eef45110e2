"""FLOPs per generated frame of Hallo / Hallo2 at 512x512 (clip 16 + 2 motion frames, 40 guided DDIM steps),
counted with torch.utils.flop_counter on the meta device (no weights, seconds on a CPU).

    python bench/flops_hallo.py [--steps 40] [--out bench/results/flops_hallo.json]

Parts (per clip, then per frame): ReferenceNet once per clip (reference + motion latents, doubled under
guidance), the denoiser per step ([uncond, cond] x 16 frames), VAE encode of reference + motion frames per
clip, VAE decode per frame, wav2vec2-base per 1/25 s of audio. Prints JSON naming the device ("meta").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emo_stream.models.hallo.config import HalloConfig  # noqa: E402
from emo_stream.models.hallo.model import ClipInputs, HalloModel  # noqa: E402


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    t0 = time.time()
    cfg = HalloConfig()
    f, nm, lat = cfg.clip_length, cfg.motion_frames, args.size // 8
    dev = torch.device("meta")
    with dev:
        model = HalloModel(cfg).eval()
        from diffusers import AutoencoderKL
        from transformers import Wav2Vec2Config, Wav2Vec2Model
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=2, sample_size=512)
        wav = Wav2Vec2Model(Wav2Vec2Config())
    n_levels = len(cfg.unet["block_out_channels"])
    masks = [tuple(torch.zeros(1, (lat // 2 ** k) ** 2, device=dev) for _ in range(3)) for k in range(n_levels)]
    clip = ClipInputs(ref_latents=torch.zeros(1 + nm, 4, lat, lat, device=dev),
                      face_tokens=torch.zeros(1, 4, 768, device=dev),
                      uncond_face_tokens=torch.zeros(1, 4, 768, device=dev),
                      audio_tokens=torch.zeros(1, f, 32, 768, device=dev), masks=masks,
                      face_feature=torch.zeros(1, 320, f, lat, lat, device=dev))
    latents = torch.zeros(1, 4, f, lat, lat, device=dev)
    t = torch.tensor(999, device=dev)
    with torch.no_grad():
        ref = count(lambda: model.prepare_reference(clip, guided=True))
        step = count(lambda: model.denoise(latents, t, clip, guided=True))
        enc = count(lambda: vae.encode(torch.zeros(1, 3, args.size, args.size, device=dev)))
        dec = count(lambda: vae.decode(torch.zeros(1, 4, lat, lat, device=dev)))
        audio_1s = count(lambda: wav(torch.zeros(1, 16000, device=dev)))
        proj = count(lambda: model.audioproj(torch.zeros(1, f, 5, 12, 768, device=dev)))
    per_frame = {
        "reference_net": ref / f,
        "denoise_step_guided": step / f,
        "denoise_all_steps": args.steps * step / f,
        "vae_encode_ref_and_motion": (1 + nm) * enc / f,
        "vae_decode": dec,
        "audio_wav2vec2_and_proj": audio_1s / cfg.fps + proj / f,
    }
    per_frame["total"] = sum(v for k, v in per_frame.items() if k != "denoise_step_guided")
    result = {"bench": "flops_hallo", "device": "meta (FLOP count, no compute)", "host": platform.node(),
              "torch": torch.__version__, "size": args.size, "clip_frames": f, "motion_frames": nm,
              "steps": args.steps, "guidance": cfg.guidance,
              "gflops_per_frame": {k: round(v / 1e9, 1) for k, v in per_frame.items()},
              "seconds": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
