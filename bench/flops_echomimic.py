"""FLOPs per generated frame of EchoMimic v1 at 512x512, acc (6 steps, no guidance) and normal (30 steps,
guidance 2.5), counted with torch.utils.flop_counter on the meta device (no weights, seconds on a CPU).

    python bench/flops_echomimic.py [--size 512] [--out bench/results/flops_echomimic-meta.json]

Per frame of a long video: context windows of 12 frames overlapping by 3 evaluate 12/9 frames per
generated frame at every step (guidance doubles the rows; the unconditional rows skip the reference
attention); the ReferenceNet runs once per video (reported per call, amortised to ~0); whisper-tiny runs
on 30 s segments (per frame = one segment / (30 s x 24 fps) for long audio; a short clip still pays a whole
segment); the face locator once per video; sd-vae-ft-mse decode per frame (TAESD decode next to it).
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

from emo_stream.models.echomimic.config import EchoMimicConfig  # noqa: E402
from emo_stream.models.echomimic.model import EchoMimicModel  # noqa: E402


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    t0 = time.time()
    cfg = EchoMimicConfig()
    f, overlap, lat = cfg.sampling.context_frames, cfg.sampling.context_overlap, args.size // 8
    dev = torch.device("meta")
    with dev:
        model = EchoMimicModel.build(cfg)
        from diffusers import AutoencoderKL, AutoencoderTiny
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=2, sample_size=512)
        taesd = AutoencoderTiny()
    z = lambda *shape: torch.zeros(*shape, device=dev)  # noqa: E731
    tokens = cfg.audio_tokens_per_frame
    with torch.no_grad():
        bank = {k: v for k, v in model.encode_reference(z(1, 4, lat, lat)).items()}
        ref = count(lambda: model.encode_reference(z(1, 4, lat, lat)))
        t = torch.tensor(999, device=dev)
        cond = count(lambda: model.denoise(z(1, 4, f, lat, lat), t, z(1, f, tokens, 384), z(1, 320, 1, lat, lat),
                                           None, bank))
        uncond = count(lambda: model.denoise(z(1, 4, f, lat, lat), t, z(1, f, tokens, 384),
                                             z(1, 320, 1, lat, lat), None, None))
        face = count(lambda: model.face_feature(z(1, 1, args.size, args.size)))
        whisper = count(lambda: model.whisper.encoder(z(1, 80, 3000)))
        dec = count(lambda: vae.decode(z(1, 4, lat, lat)))
        dec_taesd = count(lambda: taesd.decode(z(1, 4, lat, lat)))
        enc = count(lambda: vae.encode(z(1, 3, args.size, args.size)))
    frames_per_frame = f / (f - overlap)
    step_cond = cond / f * frames_per_frame
    step_guided = (cond + uncond) / f * frames_per_frame
    modes = {"acc": (6, step_cond), "normal": (30, step_guided)}
    out: dict = {}
    for mode, (steps, per_step) in modes.items():
        per_frame = {"denoise_step": per_step, "denoise_all_steps": steps * per_step,
                     "whisper_tiny": whisper / (30 * cfg.fps), "vae_decode": dec, "taesd_decode": dec_taesd}
        per_frame["total_vae"] = per_frame["denoise_all_steps"] + per_frame["whisper_tiny"] + dec
        per_frame["total_taesd"] = per_frame["denoise_all_steps"] + per_frame["whisper_tiny"] + dec_taesd
        out[mode] = {"steps": steps, "guidance": 1.0 if mode == "acc" else 2.5,
                     "gflops_per_frame": {k: round(v / 1e9, 1) for k, v in per_frame.items()}}
    result = {"bench": "flops_echomimic", "device": "meta (FLOP count, no compute)", "host": platform.node(),
              "torch": torch.__version__, "size": args.size, "context_frames": f, "context_overlap": overlap,
              "fps": cfg.fps, "frame_evaluations_per_frame": round(frames_per_frame, 3), "modes": out,
              "once_per_video_gflops": {"reference_net": round(ref / 1e9, 1), "face_locator": round(face / 1e9, 1),
                                        "vae_encode_reference": round(enc / 1e9, 1)},
              "denoiser_call_12_frames_gflops": {"cond": round(cond / 1e9, 1), "uncond": round(uncond / 1e9, 1)},
              "whisper_segment_30s_gflops": round(whisper / 1e9, 1),
              "seconds": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
