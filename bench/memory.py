"""Device memory per family at working sizes (bf16), counted on the meta device: no GPU, no weights.

    python bench/memory.py [--size 512] [--batches 1,4,8] [--json bench/results/memory.json]

For every family the backend is built at full size with its parameters on the meta device (nothing is
allocated, nothing computed), one session's avatar is prepared there (reference features, latents; MuseTalk: a
portrait's 100 base frames and their idle cache), and one continuing segment (denoise + decode, one step:
every step has the same peak) runs for batches of 1, 4 and 8 sessions inside emo_stream.blocks.memory.PeakMemory
(Hallo runs sessions one after another: its batches all have one session's peak). Each op on meta goes through
Python meta kernels, so a 512 px segment takes tens of seconds of CPU: the runs are kept few (the first
segment once, then one continuing segment per batch size: 73 s of CPU for the four families at 512 px).
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

import torch

from _common import emit_json  # bench/; puts the repo on sys.path

from emo_stream.blocks.memory import MemoryProfile

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

    from emo_stream.families.emo.config import load_config
    from emo_stream.families.hallo.backend import HalloBackend
    from emo_stream.families.hallo.config import HalloConfig
    from emo_stream.families.hallo.model import HalloModel

    cfg = HalloConfig(image_size=size)
    with init_empty_weights(include_buffers=False):
        model = HalloModel(cfg, None, vae=AutoencoderKL(**load_config("sd15").vae))
    backend = HalloBackend(model.eval().to(META, DTYPE), size=size, steps=1, guidance=cfg.guidance)
    profile = backend.memory_profile(tuple(batches))   # wav2vec2-base counted in the weights
    profile.family = "hallo (offline clips, guided)"
    return profile


def musetalk(size: int, batches: list[int]) -> MemoryProfile:
    from emo_stream.families.musetalk.backend import MuseTalkBackend
    from emo_stream.families.musetalk.testing import random_model

    # the published networks (SD1.5-sized UNet, SD VAE, whisper-tiny) on meta; the live default: 5-frame
    # segments, a portrait's 4 s preview loop as base frames (100 at 25 fps)
    model = random_model(full=True, device=META, dtype=DTYPE)
    profile = MuseTalkBackend(model, size=size, cache_dir="").memory_profile(tuple(batches))
    profile.family = "musetalk (1.5, live)"
    return profile


FAMILIES: dict[str, Callable[[int, list[int]], MemoryProfile]] = {"emo": emo, "echomimic": echomimic,
                                                                    "hallo": hallo, "musetalk": musetalk}


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
