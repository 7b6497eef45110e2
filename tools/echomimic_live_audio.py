"""Measure EchoMimic's live audio tokens (ours, segment by segment) against EchoMimic's whole-file pass.

    python tools/echomimic_live_audio.py /tmp/golden-echomimic-audio-eng60-w4-fps25 [--whisper DIR] [--json out.json]

The set (made by tools/golden_echomimic.py with --fps equal to the live rate) holds EchoMimic's own
whole-file features (Audio2Feature.audio2feat: log-mel of the whole file, 30 s encoder segments) and its
per-frame tokens (feature2chunks) of its audio, computed with the set's (random) whisper. --whisper DIR: a
transformers whisper folder (e.g. tiny.en from tools/whisper_from_ctranslate2.py) used instead, on the set's
audio; the whole-file reference is then our whole-file pass (WhisperFeatures.features, equal to EchoMimic's
code within 1.7e-6 on the golden sets: tests/test_echomimic_live_audio.py), since no EchoMimic output exists
for those weights.

Live: the audio goes through the engine's AudioWindow (the backend's segment length and audio context, the end
closed as an utterance) and each cut through what EchoMimicBackend.encode_audio_batch runs (audio.encode_live:
whisper's 30 s grid of the session's audio). `previous`: the design before it, for comparison (each window of
2 s left context + 3 frames of look-ahead encoded on its own, log-mel floored over the window).

Printed per design: per whisper layer the frame's relative error (below) at that layer alone, mean / p95, the
max abs error, the reference's max abs value and the RMS error over the reference RMS; per frame the relative error ||live - file|| / ||file|| over its tokens (every layer),
mean / p95 / max, and its mean by look-ahead (frames of audio received past the frame's own audio when it was
cut). No reference code runs here.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PREVIOUS_LEFT_S, PREVIOUS_LOOKAHEAD = 2.0, 3   # the live window before the grid (2 s left, 120 ms ahead)


def load_whisper(root: Path, folder: str | None):
    """The set's whisper (OpenAI layout, our importer) or a transformers whisper folder's encoder."""
    from emo_stream.families.echomimic.audio import WhisperFeatures

    if folder is None:
        from emo_stream.families.echomimic.importer import read_whisper

        dims, state = read_whisper(root / "weights" / "whisper_tiny.pt")
    else:
        from safetensors.torch import load_file

        cfg = json.loads((Path(folder) / "config.json").read_text())
        dims = {"n_mels": cfg["num_mel_bins"], "n_audio_ctx": cfg["max_source_positions"],
                "n_audio_state": cfg["d_model"], "n_audio_head": cfg["encoder_attention_heads"],
                "n_audio_layer": cfg["encoder_layers"]}
        state = {k[len("encoder."):]: v for k, v in load_file(str(Path(folder) / "model.safetensors")).items()
                 if k.startswith("encoder.")}
    w = WhisperFeatures(dims)
    w.encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return w.eval()


def cuts_of(wav: np.ndarray, spf: int, context, segment: int) -> list:
    """The engine's windowing: all audio pushed, the utterance closed, segments cut until none is left."""
    from emo_stream.streaming.window import AudioWindow

    window = AudioWindow(spf, context)
    window.append(wav, 0.0)
    window.close_utterance(0.0)
    cuts = []
    while window.frames_ready() > 0:
        cuts.append(window.cut(segment))
    return cuts


def compare(live: torch.Tensor, ref: torch.Tensor, lookahead: np.ndarray, layers: int) -> dict:
    n = min(len(live), len(ref))
    ours = live[:n].double().reshape(n, -1, layers, ref.shape[-1])
    gold = ref[:n].double().reshape(n, -1, layers, ref.shape[-1])
    d = ours - gold
    def frame_rel(dd, gg):   # per frame: ||live - file|| / ||file|| over its tokens
        return (dd.flatten(1).norm(dim=1) / gg.flatten(1).norm(dim=1).clamp(min=1e-12)).numpy()

    per_layer = [{"layer": k, "relative_error_mean": round(float(frame_rel(d[:, :, k], gold[:, :, k]).mean()), 4),
                  "relative_error_p95": round(float(np.percentile(frame_rel(d[:, :, k], gold[:, :, k]), 95)), 4),
                  "max_abs_error": round(float(d[:, :, k].abs().max()), 4),
                  "reference_max_abs": round(float(gold[:, :, k].abs().max()), 4),
                  "rms_error_over_reference_rms": round(float(d[:, :, k].pow(2).mean().sqrt()
                                                              / gold[:, :, k].pow(2).mean().sqrt()), 4)}
                 for k in range(layers)]
    rel = frame_rel(d, gold)
    la = lookahead[:n]
    return {"frames": n, "relative_error_mean": round(float(rel.mean()), 4),
            "relative_error_p95": round(float(np.percentile(rel, 95)), 4),
            "relative_error_max": round(float(rel.max()), 4),
            "relative_error_mean_by_lookahead_frames": {int(v): round(float(rel[la == v].mean()), 4)
                                                        for v in np.unique(la)},
            "worst_frames": {int(i): round(float(rel[i]), 4) for i in np.argsort(rel)[::-1][:5]},
            "frames_over_1e-4": int((d.abs().flatten(1).amax(dim=1) > 1e-4).sum()), "per_layer": per_layer}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("set", help="golden set folder with audio_case (whisper_features, whisper_chunks)")
    p.add_argument("--whisper", help="transformers whisper folder to use instead of the set's whisper")
    p.add_argument("--segment-frames", type=int, help="live segment length (default: the backend's)")
    p.add_argument("--extra-lookahead", type=int, help="extra look-ahead frames (default: the backend's)")
    p.add_argument("--no-previous", action="store_true", help="skip the previous design")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    from safetensors.torch import load_file

    from emo_stream.backend import AudioContext
    from emo_stream.families.echomimic.audio import audio_tokens, encode_live, live_context, tokens_at
    from emo_stream.families.echomimic.backend import EchoMimicBackend
    from emo_stream.families.echomimic.parity import _read_wav
    from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

    torch.set_num_threads(1)
    t0 = time.time()
    defaults = inspect.signature(EchoMimicBackend.__init__).parameters
    seg = a.segment_frames or defaults["segment_frames"].default
    extra = a.extra_lookahead if a.extra_lookahead is not None else defaults["extra_lookahead_frames"].default
    root = Path(a.set)
    case = json.loads((root / "case.json").read_text())
    ac = case["audio_case"]
    fps = int(ac["fps"])
    spf = samples_per_frame(fps)
    wav = _read_wav(root / str(ac.get("wav", "audio.wav")).split()[0]).numpy()
    whisper = load_whisper(root, a.whisper)
    layers = int(whisper.dims["n_audio_layer"]) + 1
    feats_ours = whisper.features(wav)
    if a.whisper is None:
        gold = load_file(str(root / ac.get("file", "audio.safetensors")))
        feats, ref = gold["whisper_features"], gold["whisper_chunks"]
        reference = "EchoMimic's own whole-file tokens stored in the set (its code, the set's random whisper)"
        ours_vs_echomimic = float((feats_ours - feats).abs().max())
    else:
        feats = feats_ours
        ref = audio_tokens(feats, fps, len(wav) // spf + 2)
        reference = "our whole-file pass (WhisperFeatures.features: EchoMimic's audio2feat + feature2chunks)"
        ours_vs_echomimic = None

    designs = {"grid": live_context(fps, extra)}
    if not a.no_previous:
        designs["previous"] = AudioContext(left_samples=int(PREVIOUS_LEFT_S * SAMPLE_RATE),
                                           lookahead_frames=PREVIOUS_LOOKAHEAD)
    results = {}
    for name, context in designs.items():
        t1 = time.time()
        tokens, lookahead = [], []
        for cut in cuts_of(wav, spf, context, seg):
            if name == "grid":   # what EchoMimicBackend.encode_audio_batch runs
                tokens.append(encode_live(whisper.segment_states, [(cut.window, cut.start, cut.num_frames)], fps,
                                          whisper.n_mels)[0])
            else:                # the window's own features, frames picked by time within it
                times = (cut.start + np.arange(cut.num_frames) * spf) / SAMPLE_RATE
                tokens.append(tokens_at(whisper.features(cut.window), times))
            lookahead.extend(cut.num_frames - 1 - k + context.lookahead_frames for k in range(cut.num_frames))
        res = compare(torch.cat(tokens), ref, np.asarray(lookahead), layers)
        res.update(left_context_s=context.left_samples / SAMPLE_RATE, align_s=context.align_samples / SAMPLE_RATE,
                   lookahead_frames=context.lookahead_frames, frames_live=sum(len(t) for t in tokens),
                   seconds=round(time.time() - t1, 1))
        results[name] = res
        print(name, json.dumps(res), flush=True)

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    result = {"what": "EchoMimic live audio tokens vs the whole-file tokens of the complete file (what differs: the "
                      "audio not yet received, and the design's window)",
              "command": "python tools/echomimic_live_audio.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "code": commit, "set": str(root), "audio": ac.get("source", ""), "seconds_of_audio": len(wav) / SAMPLE_RATE,
              "whisper": a.whisper or "the set's whisper_tiny.pt (random weights, whisper-tiny's shape)",
              "reference": reference, "max_abs_our_whole_file_vs_echomimic_features": ours_vs_echomimic,
              "fps": fps, "segment_frames": seg, "extra_lookahead_frames": extra,
              "frames_whole_file": len(ref), "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, 1 torch "
                                                       f"thread, load average {os.getloadavg()[0]:.1f} at the end)",
              "elapsed_s": round(time.time() - t0, 1), "results": results}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
