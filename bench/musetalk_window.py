"""How far MuseTalk's live audio prompts are from its whole-file prompts, and what the live whisper costs.

MuseTalk encodes a file in 30 s segments cut from its first sample, each zero-padded to 30 s, and takes every
frame's prompt from those states. whisper-tiny's encoder attends over its whole 30 s input, so a step's states
depend on where it sits in its segment and on the segment's whole audio. The live path (MuseTalkBackend.
encode_audio -> audio.stream_chunks) keeps MuseTalk's grid: segment k covers [30k, 30k + 30) s of the session's
audio, and each call encodes the segments its frames' prompts touch with the samples received so far,
zero-padded as MuseTalk pads a file. What is left is the audio not received yet. This measures it:

    for every `--every-s` of the file, with the stream received up to that point, the prompt of the frame
    whose own audio ended `lookahead` frames earlier (the prompt itself reaches 2 frames past its frame, so
    2 is the least), against the whole-file prompt of that frame:
    relative error = ||live - file|| / ||file|| over its 10 steps x every hidden state; mean / p95 / max, and
    the mean per hidden state (0: the embeddings)

A live segment of n frames with `extra` frames of look-ahead renders its frames with lookaheads
2 + extra .. n + 1 + extra (its first frame waits for the last one's audio). Modes: `padded` (each segment
zero-padded to 30 s: the 1500 positions whisper always saw; what MuseTalk does) and `cropped` (only the steps
received: cheaper, an input whisper never saw). `--sliding` adds the previous design (windows with a fixed
left context, zero-padded to 30 s, not on the grid) for comparison.

Cost: whisper-tiny encoder FLOPs per call counted on the meta device (one padded segment: 1500 positions;
a call that crosses a 30 s boundary encodes two), FLOPs per second of audio for a segment length, and CPU
time per call here.

    python bench/musetalk_window.py --whisper models/whisper [--audio a.wav ...] [--out bench/results/x.json]

--whisper: MuseTalk's models/whisper (openai/whisper-tiny) or any transformers whisper folder (tools/
whisper_from_ctranslate2.py makes one from faster-whisper's format).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emo_stream.families.musetalk import audio as A  # noqa: E402
from emo_stream.families.musetalk.loader import (build_extractor, build_whisper_encoder, load_strict, read_json,  # noqa: E402
                                                 read_state, whisper_encoder_state)
from emo_stream.media import load_audio  # noqa: E402

FPS, SPF, LEFT, RIGHT = 25, 640, 2, 2
SHARED = REPO.parent / "shared" / "data"


def load_whisper(folder: Path):
    enc = build_whisper_encoder(read_json(folder / "config.json"))
    weights = next(p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file())
    load_strict(enc, whisper_encoder_state(read_state(weights), weights), weights, "a whisper encoder")
    return enc.eval(), build_extractor(read_json(folder / "preprocessor_config.json"))


def rel_errors(live: torch.Tensor, ref: torch.Tensor, layers: int) -> np.ndarray:
    """(frames, 1 + layers): the relative error over everything, then per hidden state (0 = embeddings)."""
    live = live.reshape(live.shape[0], -1, layers, live.shape[-1]).double()
    ref = ref.reshape(ref.shape[0], -1, layers, ref.shape[-1]).double()

    def rel(a, b):
        return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-9)).numpy()
    cols = [rel(live, ref)] + [rel(live[:, :, i], ref[:, :, i]) for i in range(layers)]
    return np.stack(cols, axis=1)


def grid_prompts(enc, ext, audio: np.ndarray, received: int, frames: list[int], padded: bool) -> torch.Tensor:
    """Prompts of `frames` (ascending) as the live path makes them with the stream received up to sample
    `received` (audio[:received], the rest of its 30 s segment zero-padded)."""
    got = audio[:received]
    lo = (max(0, frames[0] * SPF - A.lead_samples(FPS, LEFT)) // A.SEGMENT_SAMPLES) * A.SEGMENT_SAMPLES
    n = frames[-1] - frames[0] + 1
    chunks = A.stream_chunks(enc, ext, got[lo:], frames[0] * SPF - lo, n, FPS, LEFT, RIGHT, padded)
    return chunks[[f - frames[0] for f in frames]]


def sliding_prompts(enc, ext, audio: np.ndarray, received: int, frames: list[int], left_s: float) -> torch.Tensor:
    """The previous design: a window of `left_s` history before the frames, zero-padded to 30 s, off the grid."""
    lo = max(0, frames[0] * SPF - int(round(left_s * FPS)) * SPF)
    window = audio[lo:received]
    states = A.encoder_states(enc, A.log_mel(ext, window))[0, : math.floor(len(window) * 50 / 16000)]
    lead = math.ceil(50 / FPS) * LEFT
    steps = [f * 2 - lead - lo // 320 for f in frames]
    return A.chunks_at(states, steps, 2 * (LEFT + RIGHT + 1))


def summary(e: np.ndarray) -> dict:
    return {"mean": round(float(e[:, 0].mean()), 4), "p95": round(float(np.percentile(e[:, 0], 95)), 4),
            "max": round(float(e[:, 0].max()), 4), "frames": int(e.shape[0]),
            "mean_per_state": [round(float(v), 4) for v in e[:, 1:].mean(0)]}


def whisper_cost(config: dict, segment_frames: list[int]) -> dict:
    """Encoder FLOPs (meta device) of one padded segment, of a cropped one (mean length: 15 s) and per second
    of audio when every live segment of n frames encodes its 30 s segment once."""
    from emo_stream.blocks.flops import META, round4, tflop

    with torch.device(META):
        enc = build_whisper_encoder(config).eval()
    padded, _ = tflop(lambda: A.encoder_states(enc, torch.zeros(1, 80, 3000, device=META)))
    cropped, _ = tflop(lambda: A.encoder_states(enc, torch.zeros(1, 80, 1500, device=META)))
    return {"gflop_per_call_padded": round4(padded * 1e3), "gflop_per_call_cropped_15s": round4(cropped * 1e3),
            "gflop_per_audio_second_padded": {str(n): round4(padded * 1e3 * FPS / n) for n in segment_frames},
            "note": "a call whose prompts cross a 30 s boundary encodes two segments (once per 30 s)"}


def cpu_times(enc, ext, audio: np.ndarray, batch: int, repeats: int) -> dict:
    """Seconds per call on this CPU: one session (padded, cropped at 15 s), `batch` sessions in one call."""
    seg = audio[: 15 * 16000]
    out = {}
    for name, fn in (("padded_1", lambda: A.encode_segments(enc, ext, [seg], True)),
                     ("cropped_15s_1", lambda: A.encode_segments(enc, ext, [seg], False)),
                     (f"padded_batch_{batch}", lambda: A.encode_segments(enc, ext, [seg] * batch, True)),
                     ("log_mel_1", lambda: A.log_mel_batch(ext, [seg]))):
        fn()
        t = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            t.append(time.process_time() - t0)
        out[name] = round(float(np.median(t)), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--whisper", type=Path, required=True)
    ap.add_argument("--audio", type=Path, nargs="*", default=None)
    ap.add_argument("--seconds", type=float, default=60.0, help="per file, from its start")
    ap.add_argument("--lookaheads", type=int, nargs="*", default=list(range(2, 15)) + [27, 52],
                    help="frames of audio received after the measured frame's own audio")
    ap.add_argument("--steady-s", type=float, default=16.4,
                    help="also summarise the frames past this time (where a 16 s sliding window no longer starts "
                         "at the file's start)")
    ap.add_argument("--extras", type=int, nargs="*", default=[0, 1, 2, 3, 8],
                    help="extra look-ahead frames for the per-segment summary")
    ap.add_argument("--every-s", type=float, default=0.5, help="a measurement point every this many seconds")
    ap.add_argument("--modes", nargs="*", default=["padded", "cropped"], choices=["padded", "cropped"])
    ap.add_argument("--sliding", type=float, nargs="*", default=[], help="left contexts (s) of the old design")
    ap.add_argument("--segments", type=int, nargs="*", default=[5, 8], help="live segment lengths for the cost")
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--source", default="", help="what --whisper is (for the record)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    enc, ext = load_whisper(args.whisper)
    files = args.audio or [SHARED / "audio" / "eng_60s_16k.wav"]
    files = [f for f in files if Path(f).is_file()]
    if not files:   # ../shared/data absent and no --audio given
        raise SystemExit("no speech to measure: pass --audio FILE (../shared/data is not present)")
    t0 = time.time()
    rows: dict[str, list[np.ndarray]] = {}
    when: dict[str, list[float]] = {}
    looks = sorted(args.lookaheads)
    with torch.no_grad():
        for f in files:
            audio = load_audio(f)[: int(args.seconds * 16000)]
            ref = A.file_chunks(enc, ext, audio, FPS, LEFT, RIGHT)
            layers = ref.shape[1] // (2 * (LEFT + RIGHT + 1))
            total = len(ref)
            every = max(1, int(round(args.every_s * FPS)))
            for r in range(looks[-1] + 1, total - 3, every):   # r: whole frames received
                frames = [r - 1 - la for la in reversed(looks)]
                variants = {m: grid_prompts(enc, ext, audio, r * SPF, frames, m == "padded") for m in args.modes}
                variants.update({f"sliding left={s:g}s": sliding_prompts(enc, ext, audio, r * SPF, frames, s)
                                 for s in args.sliding})
                for name, live in variants.items():
                    errs = rel_errors(live, ref[frames], layers)
                    for la, e in zip(reversed(looks), errs):
                        rows.setdefault(f"{name} lookahead={la}", []).append(e[None])
                        when.setdefault(f"{name} lookahead={la}", []).append((r - 1 - la) / FPS)
                print(f"{Path(f).name} received {r / FPS:.2f} s: " + ", ".join(
                    f"{n} {rel_errors(v, ref[frames], layers)[:, 0].round(3).tolist()}" for n, v in variants.items()),
                    flush=True)
    table = {}
    for k, v in rows.items():
        e = np.concatenate(v)
        table[k] = summary(e)
        late = np.asarray(when[k]) >= args.steady_s
        if late.any():
            table[k][f"mean_after_{args.steady_s:g}s"] = round(float(e[late, 0].mean()), 4)
    # a live segment of n frames with `extra` look-ahead renders frame i (of n) with lookahead n + 1 - i + extra
    segments = {}
    for mode in list(args.modes) + [f"sliding left={s:g}s" for s in args.sliding]:
        for n in args.segments:
            for extra in args.extras:
                keys = [f"{mode} lookahead={la}" for la in range(2 + extra, n + 2 + extra)]
                if all(k in table for k in keys):
                    segments[f"{mode} segment={n} extra={extra}"] = {
                        "mean": round(float(np.mean([table[k]["mean"] for k in keys])), 4),
                        "latency_ms_added": 40 * extra}
    record = {
        "what": "relative error of live whisper prompts vs MuseTalk's whole-file prompts, per frame, by how many "
                "frames of audio had arrived after the frame's own audio (lookahead; 2 = the prompt's own reach)",
        "command": "python " + " ".join(sys.argv),
        "whisper": args.source or str(args.whisper),
        "audio": [str(Path(f).name) for f in files], "seconds_per_file": args.seconds, "every_s": args.every_s,
        "fps": FPS,
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads, "
                  f"load average {os.getloadavg()[0]:.1f} at the end)",
        "elapsed_s": round(time.time() - t0, 1), "results": table, "per_segment": segments,
        "cost": whisper_cost(read_json(args.whisper / "config.json"), args.segments),
    }
    with torch.no_grad():
        record["cost"]["cpu_s_per_call"] = cpu_times(enc, ext, load_audio(files[0]), 4, args.timing_repeats)
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
