"""Device memory per family at working sizes (bf16), counted on the meta device: no GPU, no weights.

    python bench/memory.py [--size 512] [--batches 1,4,8] [--json bench/results/memory.json]

For every live-capable family the backend is built at full size with its parameters on the meta device, one
session's avatar is prepared there (ReferenceNet features, latents), and one segment (denoise + decode, one
step: every step has the same peak) runs for batches of 1, 4 and 8 sessions inside emo_stream.blocks.memory.PeakMemory.
Each record: weights, per-session bytes (avatar + state, kept between segments), activation peak per batch,
and how many sessions fit in 24, 48 and 80 GiB with batches of up to 4 (the engine's default max_batch) after
a 10% headroom. Not counted: the CUDA context and kernels' workspace (~0.5-1 GiB, inside the headroom), the audio
encoders' activations (they run between denoise calls, a few MiB), and the allocator's fragmentation.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable

import numpy as np
import torch

from _common import emit_json  # bench/; puts the repo on sys.path

from emo_stream.blocks.memory import MemoryProfile, profile_segments, weight_bytes

META = torch.device("meta")
DTYPE = torch.bfloat16


def emo(size: int, batches: list[int]) -> MemoryProfile:
    from emo_stream.families.emo.backend import EmoBackend
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.emo.model import EmoModel

    model = EmoModel.build(load_config("sd15_live"), empty=True).eval().to(META, DTYPE)
    profile = EmoBackend(model, size=size, steps=1).memory_profile(tuple(batches))
    profile.family = "emo (sd15_live, live)"
    return profile


def echomimic(size: int, batches: list[int]) -> MemoryProfile:
    from diffusers import AutoencoderTiny

    from emo_stream.families.echomimic.backend import EchoMimicBackend, ModelParts
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.echomimic.config import EchoMimicConfig
    from emo_stream.families.echomimic.model import EchoMimicModel

    sd = load_config("sd15")
    model = EchoMimicModel.build(EchoMimicConfig(weights_set="acc", vae=sd.vae), empty=True).eval().to(META, DTYPE)
    taesd = AutoencoderTiny(**sd.taesd).to(META, DTYPE)
    profile = EchoMimicBackend(ModelParts(model, taesd), size=size, steps=1, decoder="taesd").memory_profile(
        tuple(batches))
    profile.family = "echomimic-v1 (acc, live)"
    return profile


def hallo(size: int, batches: list[int]) -> MemoryProfile:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from emo_stream.backend import SegmentJob
    from emo_stream.families.hallo.backend import HalloBackend
    from emo_stream.families.emo.config import load_config
    from emo_stream.families.hallo.config import HalloConfig
    from emo_stream.families.hallo.model import HalloModel

    cfg = HalloConfig(image_size=size)
    with init_empty_weights(include_buffers=False):
        model = HalloModel(cfg, None, vae=AutoencoderKL(**load_config("sd15").vae))
    model = model.eval().to(META, DTYPE)
    backend = HalloBackend(model, size=size, steps=1, guidance=cfg.guidance)
    rng = np.random.default_rng(0)
    s = size / 128   # the test portrait's landmarks (tests/test_hallo_backend.py), scaled to the size
    lm = np.concatenate([rng.uniform([30, 40], [98, 110], (48, 2)), rng.uniform([52, 86], [76, 98], (20, 2))]) * s
    avatar = backend.avatar_from_crop(np.zeros((size, size, 3), np.uint8), lm, np.zeros(512, np.float32))
    ap, f = cfg.audioproj, backend.stream_segment_frames

    def jobs(n):
        wins = torch.zeros(f, ap["seq_len"], ap["blocks"], ap["channels"], device=META, dtype=DTYPE)
        return backend, [SegmentJob(avatar, backend.new_state(avatar, k), wins, f) for k in range(n)]
    # wav2vec2-base (95 M parameters) is loaded beside the model: counted in the weights
    wav2vec2 = 95_000_000 * 2
    profile = profile_segments("hallo (offline clips, guided)", size, weight_bytes(model, dtype=DTYPE) + wav2vec2,
                               jobs, lambda b, j: b.generate(j), tuple(batches))
    return profile


FAMILIES: dict[str, Callable[[int, list[int]], MemoryProfile]] = {"emo": emo, "echomimic": echomimic,
                                                                    "hallo": hallo}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--json", default=None, help="also write the result here (e.g. bench/results/memory.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.monotonic()
    records, failed = [], []
    for name in args.families.split(","):
        try:
            records.append(FAMILIES[name](args.size, batches).to_dict())
        except Exception as exc:  # noqa: BLE001 (one family's failure must not hide the others)
            logging.exception("profiling %s failed", name)
            failed.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    emit_json({"bench": "memory", "device": "meta (counted with emo_stream.blocks.memory.PeakMemory, nothing computed)",
               "torch": torch.__version__, "size": args.size, "dtype": str(DTYPE).replace("torch.", ""),
               "unit": "GiB (weights, activations), MiB (per session)", "records": records, "failed": failed,
               "seconds": round(time.monotonic() - t0, 1)}, args.json)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
