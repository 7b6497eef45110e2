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


def _r(v: float) -> float:
    """4 significant digits: sd15 figures read as 0.8074, the tiny preset's stay non-zero."""
    return float(f"{v:.4g}")


def tflop(fn: Callable[[], Any], by_module: bool = False) -> tuple[float, dict]:
    """(TFLOP counted while running fn, per-module counts if asked)."""
    counter = FlopCounterMode(display=False, depth=None if by_module else 1)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e12, (counter.get_flop_counts() if by_module else {})


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


def _totals(per_step: float, parts: dict[str, float]) -> dict[str, Any]:
    """The per-frame fields every family's record shares, rounded."""
    return {"tflop_per_frame_per_step": _r(per_step), "tflop_per_frame_total": _r(sum(parts.values())),
            "parts": {k: _r(v) for k, v in parts.items()}}


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
    return {k: _r(v) for k, v in out.items()}


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
        "exact_shortcuts": shortcuts, **_totals(per_step, parts),
        "reference_tflop_per_avatar": _r(ref_t),
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


# ---- EchoMimic v1 --------------------------------------------------------------------------------------
def _sd15_decoders() -> tuple[dict, dict]:
    from emo_stream.models.config import load_config

    cfg = load_config("sd15")
    return cfg.vae, cfg.taesd


def count_echomimic(weights: str, mode: str, size: int = 512) -> dict[str, Any]:
    """EchoMimic v1 as emo_stream's EchoMimic backend runs it: offline, 12-frame context windows overlapping
    by 3 (9 new frames per window); live, 8-frame segments denoised with the 4 held frames before them
    (12 frames per call). acc weights: 6 steps without guidance; normal: 30 steps, guidance 2.5 (the
    unconditional branch drops audio, face and reference). Audio: whisper-tiny over a 30 s mel window."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from emo_stream.models.echomimic.config import EchoMimicConfig
    from emo_stream.models.echomimic.model import EchoMimicModel

    vae_cfg, taesd_cfg = _sd15_decoders()
    cfg = EchoMimicConfig(weights_set=weights, vae=vae_cfg)
    steps, guidance = (6, 1.0) if weights == "acc" else (30, 2.5)
    decoder = "taesd" if mode == "live" else "vae"
    window, new = (12, 9) if mode == "offline" else (12, 8)
    model = EchoMimicModel.build(cfg, empty=True).eval().to(META)
    h = size // 8
    holder: dict[str, Any] = {}
    ref_t, _ = tflop(lambda: holder.__setitem__("bank", model.encode_reference(torch.zeros(1, 4, h, h, device=META))))
    face_t, _ = tflop(lambda: holder.__setitem__("face", model.face_feature(torch.zeros(1, 1, size, size, device=META))))
    try:
        mel = torch.zeros(cfg.whisper["n_mels"], 3000, device=META)
        audio_t, _ = tflop(lambda: model.whisper.features_from_mel(mel))
        audio_note = "whisper-tiny encoder over one 30 s mel window, once per segment/window"
    except Exception as exc:  # noqa: BLE001 (the audio encoder's share is small; say so rather than fail)
        audio_t, audio_note = 0.0, f"not counted ({type(exc).__name__})"
    tokens = torch.zeros(1, window, cfg.audio_tokens_per_frame, cfg.audio_dim, device=META)
    x = torch.zeros(1, 4, window, h, h, device=META)
    t = torch.tensor(500, device=META)
    step_t, _ = tflop(lambda: model.denoise(x, t, tokens, holder["face"], None, holder["bank"]))
    # the unconditional branch drops the reference: plain self-attention, as with no bank
    uncond_t, _ = tflop(lambda: model.denoise(x, t, torch.zeros_like(tokens), None, None, None))
    dec = AutoencoderTiny(**taesd_cfg) if decoder == "taesd" else AutoencoderKL(**vae_cfg)
    dec = dec.to(META) if decoder == "taesd" else model.vae
    dec_t, _ = tflop(lambda: dec.decode(torch.zeros(1, 4, h, h, device=META)))
    per_step = step_t / new
    parts = {"reference": ref_t / (AMORTISE_SECONDS * FPS), "motion": 0.0, "audio": audio_t / new,
             "condition": face_t / (AMORTISE_SECONDS * FPS), "denoise": steps * per_step,
             "guidance": steps * uncond_t / new if guidance != 1.0 else 0.0, "decode": dec_t}
    return {"family": "echomimic-v1", "variant": f"EchoMimic v1 {weights} weights, {mode}", "mode": mode,
            "steps": steps, "guidance": guidance, "decoder": decoder, "segment_frames": new,
            "frames_per_denoiser_call": window, "size": size, **_totals(per_step, parts),
            "reference_tflop_per_avatar": _r(ref_t),
            "audio_counted": audio_note}


def echomimic_records(size: int) -> list[dict[str, Any]]:
    return [count_echomimic("normal", "offline", size), count_echomimic("acc", "offline", size),
            count_echomimic("acc", "live", size)]


# ---- Hallo ------------------------------------------------------------------------------------------
def count_hallo(size: int = 512) -> dict[str, Any]:
    """Hallo offline, as emo_stream.models.hallo samples a clip (bench/hallo_speed.py): per 16-frame clip the
    ReferenceNet on the reference + 2 motion frames (twice with guidance), 40 guided DDIM steps, SD VAE.
    The wav2vec2 audio encoder is not counted (its share is ~0.002 TFLOP per frame, as in EMO's)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from emo_stream.models.hallo.config import HalloConfig
    from emo_stream.models.hallo.model import ClipInputs, HalloModel

    vae_cfg, _ = _sd15_decoders()
    cfg = HalloConfig(image_size=size)
    with init_empty_weights(include_buffers=False):
        model = HalloModel(cfg, None, vae=AutoencoderKL(**vae_cfg))
    model = model.eval().to(META)
    lat, f, nm = size // 8, cfg.clip_length, cfg.motion_frames
    tok, adim = cfg.imageproj["cross_attention_dim"], cfg.audioproj["output_dim"]
    z = lambda *shape: torch.zeros(*shape, device=META)  # noqa: E731
    clip = ClipInputs(ref_latents=z(1 + nm, 4, lat, lat), face_tokens=z(1, 4, tok), uncond_face_tokens=z(1, 4, tok),
                      audio_tokens=z(1, f, cfg.audioproj["context_tokens"], adim),
                      masks=[tuple(z(1, (lat // 2 ** k) ** 2) for _ in range(3))
                             for k in range(len(cfg.unet["block_out_channels"]))],
                      face_feature=z(1, cfg.face_locator["conditioning_embedding_channels"], f, lat, lat))
    guided = cfg.guidance > 1.0
    ref_t, _ = tflop(lambda: model.prepare_reference(clip, guided))
    x = z(1, 4, f, lat, lat)
    t = torch.tensor(500, device=META)
    both_t, _ = tflop(lambda: model.denoise(x, t, clip, guided))
    one_t, _ = tflop(lambda: model.denoise(x, t, clip, False))
    dec_t, _ = tflop(lambda: model.vae.decode(z(1, 4, lat, lat)))
    per_step = one_t / f
    parts = {"reference": ref_t / f, "motion": 0.0, "audio": 0.0, "condition": 0.0, "denoise": cfg.steps * per_step,
             "guidance": cfg.steps * (both_t - one_t) / f if guided else 0.0, "decode": dec_t}
    return {"family": "hallo", "variant": "Hallo, offline", "mode": "offline", "steps": cfg.steps,
            "guidance": cfg.guidance, "decoder": "vae", "segment_frames": f, "motion_frames": nm, "size": size,
            **_totals(per_step, parts),
            "notes": "reference = the ReferenceNet on reference + motion frames, once per clip (Hallo re-runs it); "
                     "audio (wav2vec2) not counted; no live mode in this family"}


COUNTERS: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "emo": emo_records, "echomimic-v1": echomimic_records, "hallo": lambda size: [count_hallo(size)]}


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
            try:
                records += COUNTERS[name](args.size)
            except Exception as exc:  # noqa: BLE001 (one family's counter must not hide the others)
                logging.exception("counting %s failed", name)
                missing.append(f"{name}: counter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
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
