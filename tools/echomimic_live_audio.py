"""Measure EchoMimic's live audio tokens (ours, segment by segment) against EchoMimic's whole-file pass.

    python tools/echomimic_live_audio.py /tmp/golden-echomimic-audio-eng60-w4-fps25 [--json out.json]

The set (made by tools/golden_echomimic.py with --fps equal to the live rate) holds EchoMimic's own
whole-file features (Audio2Feature.audio2feat: log-mel of the whole file, 30 s encoder segments) and its
per-frame tokens (feature2chunks). Our live path is the one `emo-stream serve` runs: the audio goes through
the engine's AudioWindow (segments of the backend's segment length, its left context and look-ahead, the end
closed as an utterance) and each cut through EchoMimicBackend.encode_audio, with the set's whisper weights
loaded by our importer. Printed per whisper layer: max abs error, the golden layer's max abs value, and the
RMS error relative to the golden RMS; whether every frame takes the same feature rows; the log-mel
difference the window's own normalisation makes. No reference code runs here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("set", help="golden set folder with audio_case (whisper_features, whisper_chunks)")
    p.add_argument("--segment-frames", type=int, help="live segment length (default: the backend's)")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    from safetensors.torch import load_file

    from emo_stream.families.echomimic.audio import log_mel, rows_at
    from emo_stream.families.echomimic.backend import EchoMimicBackend, ModelParts
    from emo_stream.families.echomimic.importer import load_download
    from emo_stream.families.echomimic.parity import _read_wav, config_from_case, weights_set_of
    from emo_stream.streaming.window import AudioWindow
    from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

    torch.set_num_threads(1)
    root = Path(a.set)
    case = json.loads((root / "case.json").read_text())
    ac = case["audio_case"]
    fps = int(ac["fps"])
    gold = load_file(str(root / ac.get("file", "audio.safetensors")))
    model = load_download(root / "weights", config=config_from_case(case, root / "weights"),
                          weights_set=weights_set_of(case), with_vae=False)

    class Parts(ModelParts):   # the backend insists on a decoder; this measurement never decodes
        def has_decoder(self, decoder: str) -> bool:
            return True

    backend = EchoMimicBackend(Parts(model), size=64, fps=fps,
                               **({"segment_frames": a.segment_frames} if a.segment_frames else {}))
    seg = backend.stream_segment_frames
    wav = _read_wav(root / str(ac.get("wav", "audio.wav")).split()[0]).numpy()
    spf = samples_per_frame(fps)

    # the engine's windowing: all audio pushed, the utterance closed, segments cut until none is left
    window = AudioWindow(spf, backend.audio_context)
    window.append(wav, 0.0)
    window.close_utterance(0.0)
    live, rows, windows = [], [], []
    while window.frames_ready() > 0:
        cut = window.cut(seg)
        live.append(backend.encode_audio(cut.window, cut.start, cut.num_frames))
        lo = cut.first_frame * spf - cut.start                  # absolute first sample of the window
        times = (cut.start + np.arange(cut.num_frames) * spf) / SAMPLE_RATE
        feats_rows = (len(cut.window) // 160) // 2
        assert lo % 320 == 0, "window not on a feature row"
        rows.append(rows_at(times, feats_rows) + lo // 320)
        windows.append((lo, len(cut.window)))
    live_t = torch.cat(live)
    live_rows = torch.cat(rows)

    chunks, index, feats = gold["whisper_chunks"], gold["chunk_feature_index"], gold["whisper_features"]
    n = min(len(live_t), len(chunks))
    layers = feats.shape[1]
    ours = live_t[:n].reshape(n, -1, layers, feats.shape[-1])
    ref = chunks[:n].reshape(n, -1, layers, feats.shape[-1])
    per_layer = []
    for k in range(layers):
        d = (ours[:, :, k] - ref[:, :, k]).double()
        g = ref[:, :, k].double()
        per_layer.append({"layer": k, "max_abs_error": float(d.abs().max()), "golden_max_abs": float(g.abs().max()),
                          "rms_error_over_golden_rms": float(d.pow(2).mean().sqrt() / g.pow(2).mean().sqrt()),
                          "frames_over_1e-4": int((d.abs().amax(dim=(1, 2)) > 1e-4).sum())})
    same_rows = live_rows[:n] == index[:n].clamp(max=feats.shape[0] - 1)
    # how much the window's own log-mel normalisation moves the input (max - 8 floor over the window)
    whole = log_mel(wav)
    mel_err = 0.0
    for lo, length in windows:
        m = log_mel(wav[lo:lo + length]) if lo + length <= len(wav) else None
        if m is not None:
            a0 = lo // 160
            mel_err = max(mel_err, float((m - whole[:, a0:a0 + m.shape[1]]).abs().max()))
    result = {"set": str(root), "fps": fps, "segment_frames": seg,
              "left_context_s": backend.audio_context.left_samples / SAMPLE_RATE,
              "lookahead_frames": backend.audio_context.lookahead_frames, "seconds": len(wav) / SAMPLE_RATE,
              "frames_compared": n, "frames_live": len(live_t), "frames_whole_file": len(chunks),
              "frames_with_same_feature_rows": int(same_rows.all(dim=1).sum()),
              "frames_with_other_rows": [int(i) for i in torch.nonzero(~same_rows.all(dim=1)).flatten()[:20]],
              "max_log_mel_error_windows_inside_the_file": mel_err, "per_layer": per_layer}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
