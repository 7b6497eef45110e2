"""How far MuseTalk's live audio prompts (whisper over a window of the stream) are from its whole-file prompts.

whisper-tiny's encoder attends over its whole input, so a window that holds only `left` seconds of history and
the segment's look-ahead gives other hidden states than the file as MuseTalk encodes it. For each left context
(and extra look-ahead past the prompt's own 2 frames) this replays a stream in live segments exactly as the
backend does (MuseTalkBackend.encode_audio: window -> whisper -> per-frame prompts) and compares every frame's
prompt with the whole-file prompt (MuseTalk's get_whisper_chunk on the file, at most 30 s: one whisper input):

    relative error = ||live - file|| / ||file|| per frame (all 10 steps x every layer), mean / p95 / max, and
    the mean per hidden state (0: the embeddings, which carry whisper's absolute position table: a window
    puts a frame at another position than the file does, so this part never vanishes unless the window
    starts where the file does)

Both window forms are measured: `padded` (the window zero-padded to whisper's 30 s, as MuseTalk does a file,
the encoder always sees 1500 positions) and `cropped` (only the window's own positions: cheaper, an input
length whisper never saw in training).

    python bench/musetalk_window.py --whisper models/whisper [--audio a.wav ...] [--out bench/results/x.json]

--whisper: MuseTalk's models/whisper (openai/whisper-tiny) or any transformers whisper folder (tools/
whisper_from_ctranslate2.py makes one from faster-whisper's format).
"""

from __future__ import annotations

import argparse
import json
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


def live_prompts(enc, ext, audio: np.ndarray, left_s: float, extra: int, segment: int, padded: bool,
                 first: int, frames: int) -> torch.Tensor:
    """Prompts of frames [first, first + frames) as the live backend makes them, segment by segment."""
    left = int(round(left_s * FPS)) * SPF
    look = (RIGHT + extra) * SPF
    stream = np.concatenate([audio, np.zeros(look, np.float32)])
    out = []
    for s in range(first, first + frames, segment):
        n = min(segment, first + frames - s)
        start = s * SPF
        lo = max(0, start - left)
        window = stream[lo:start + n * SPF + look]
        states = A.window_states(enc, ext, window, padded=padded)
        out.append(A.live_chunks(states, start - lo, n, FPS, LEFT, RIGHT))
    return torch.cat(out)


def rel_errors(live: torch.Tensor, ref: torch.Tensor, layers: int) -> np.ndarray:
    """(frames, 1 + layers): the relative error over everything, then per hidden state (0 = embeddings)."""
    live = live.reshape(live.shape[0], -1, layers, live.shape[-1]).double()
    ref = ref.reshape(ref.shape[0], -1, layers, ref.shape[-1]).double()
    def rel(a, b):
        return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-9)).numpy()
    cols = [rel(live, ref)] + [rel(live[:, :, i], ref[:, :, i]) for i in range(layers)]
    return np.stack(cols, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--whisper", type=Path, required=True)
    ap.add_argument("--audio", type=Path, nargs="*", default=None)
    ap.add_argument("--seconds", type=float, default=20.0, help="per file, from its start (at most 30)")
    ap.add_argument("--contexts", type=float, nargs="*", default=[0.0, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--extras", type=int, nargs="*", default=[0, 3])
    ap.add_argument("--segment", type=int, default=5, help="live segment length in frames")
    ap.add_argument("--stride-s", type=float, default=1.0, help="measure one segment every this many seconds")
    ap.add_argument("--first-s", type=float, default=0.0,
                    help="measure segments from this time on (past every context: the steady state of a long "
                         "stream, where no window starts where the file does)")
    ap.add_argument("--source", default="", help="what --whisper is (for the record)")
    ap.add_argument("--padded-only", action="store_true", help="skip the cropped-window variant")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    enc, ext = load_whisper(args.whisper)
    files = args.audio or [SHARED / "audio" / "eng_60s_16k.wav", SHARED / "clips" / "short_case_10" / "aud.mp3",
                           SHARED / "clips" / "emo_talk_kara" / "aud.mp3"]
    files = [f for f in files if Path(f).is_file()]
    if not files:   # ../shared/data absent and no --audio given
        raise SystemExit("no speech to measure: pass --audio FILE (../shared/data is not present)")
    results: dict[str, dict] = {}
    t0 = time.time()
    with torch.no_grad():
        for f in files:
            audio = load_audio(f)[: int(min(args.seconds, 30.0) * 16000)]
            ref = A.frame_chunks(A.file_states(enc, ext, audio), len(audio) // SPF, FPS, LEFT, RIGHT)
            starts = list(range(int(args.first_s * FPS), len(ref) - args.segment, int(args.stride_s * FPS)))
            layers = ref.shape[1] // (2 * (LEFT + RIGHT + 1))
            for padded in ((True,) if args.padded_only else (True, False)):
                for extra in args.extras:
                    for left_s in args.contexts:
                        errs = np.concatenate([rel_errors(live_prompts(enc, ext, audio, left_s, extra, args.segment,
                                                                       padded, s, args.segment),
                                                          ref[s:s + args.segment], layers) for s in starts])
                        key = f"{'padded' if padded else 'cropped'} left={left_s:g}s extra={extra}"
                        results.setdefault(key, {"errors": []})["errors"].append(errs)
                        print(f"{Path(f).name}: {key}: mean {errs[:, 0].mean():.3f} per state "
                              f"{np.round(errs[:, 1:].mean(0), 3).tolist()}", flush=True)
    table = {}
    for key, r in results.items():
        e = np.concatenate(r["errors"])
        table[key] = {"mean": round(float(e[:, 0].mean()), 4), "p95": round(float(np.percentile(e[:, 0], 95)), 4),
                      "max": round(float(e[:, 0].max()), 4), "frames": int(e.shape[0]),
                      "mean_per_state": [round(float(v), 4) for v in e[:, 1:].mean(0)]}
    record = {
        "what": "relative error of live (windowed) whisper prompts vs MuseTalk's whole-file prompts, per frame",
        "command": "python " + " ".join(sys.argv),
        "whisper": args.source or str(args.whisper),
        "audio": [str(Path(f).name) for f in files], "seconds_per_file": args.seconds,
        "measured_from_s": args.first_s, "every_s": args.stride_s,
        "segment_frames": args.segment, "fps": FPS, "device": f"cpu ({platform.processor() or platform.machine()}, "
                                                            f"{torch.get_num_threads()} threads)",
        "elapsed_s": round(time.time() - t0, 1), "results": table,
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
