"""Glass-to-glass audio latency in a real browser: Debian chromium (Playwright) talking to `emo-stream serve`.

The fake microphone plays a WAV of short 1 kHz beeps. Inside the talk page an AudioWorklet taps both
the microphone stream the page captured (getUserMedia is wrapped by an init script so the very stream
sent to the server is tapped) and the avatar's remote stream on video#avatar; both taps run on one
AudioContext clock and timestamp each beep onset to the sample. Latency per beep = remote onset -
mic onset: the avatar's audio is the user's own voice played back in sync with the lips, so this is
mic -> server -> screen/speaker for the audio, and the video is held in sync with it by the browser.
The receive jitter buffers (getStats inbound-rtp) tell how the audio and video delays split; with
`--stimulus speech` (the syllable "pa", which opens the avatar's mouth) the mouth region of every
displayed frame (requestVideoFrameCallback) also gives when the lips move on screen vs the sound.

A zero-work baseline (`--baseline`, default on) sends the same fake mic over a page-local WebRTC
loopback (two RTCPeerConnections in the same page) and measures it the same way: that is what the
browser's own capture / Opus / jitter buffer / WebAudio path costs with no server at all.

    python bench/browser_latency.py [--stimulus beep|speech] [--size 512] [--segment-frames N] [--out r.json]

Everything is bounded: the script ends by itself in well under two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from _common import start_server_process  # bench/ is the script's directory; it puts the repo on sys.path
from browser_page import BROWSER_ARGS, CHROMIUM, PAGE_KIT
RATE = 48000
SPACING_S = 1.5
BEEP_S = 0.06
HARD_LIMIT_S = 110

# The page kit (bench/browser_page.py: the mic stream, the AudioContext tap, every shown frame), plus the onset
# tap and the mouth region of every displayed avatar frame.
INIT_SCRIPT = PAGE_KIT + r"""
(() => {
  const WORKLET = `
    class Onset extends AudioWorkletProcessor {
      constructor(o) { super(); this.thr = o.processorOptions.thr; this.refr = o.processorOptions.refr;
        this.last = currentTime; this.peak = 0;  // no onset in the first refr s: the tap may start mid-burst
        this.blocks = 0; }
      process(inputs) {
        const ch = inputs[0] && inputs[0][0];
        if (ch) {
          this.blocks++;
          for (let i = 0; i < ch.length; i++) {
            const a = Math.abs(ch[i]);
            if (a > this.peak) this.peak = a;
            if (a > this.thr) {
              const t = currentTime + i / sampleRate;
              if (t - this.last > this.refr) this.port.postMessage({ t, peak: this.peak });
              this.last = t;
            }
          }
          if (this.blocks % 375 === 0) this.port.postMessage({ peak: this.peak, blocks: this.blocks });
        }
        return true;
      }
    }
    registerProcessor('onset', Onset);`;
  // Taps the streams on one AudioContext; onsets land in window.__onsets[name] (AudioContext seconds).
  window.__tap = (streams, thr, refr) => {
    window.__onsets = {}; window.__peaks = {};
    for (const name of Object.keys(streams)) { window.__onsets[name] = []; window.__peaks[name] = 0; }
    return window.__audioTap(WORKLET, 'onset', streams, { thr, refr }, (name, data) => {
      if (data.t !== undefined) window.__onsets[name].push(data.t);
      window.__peaks[name] = data.peak;
    });
  };
  // Mouth-region luminance of every displayed avatar frame: [expectedDisplayTime (performance ms), mean].
  window.__watchVideo = (video) => {
    window.__mouth = [];
    window.__eachShownFrame(video, (d, meta) => {
      let sum = 0, n = 0;   // the mouth of a centred face crop: x 26-37, y 34-40 of the 64x64 picture
      for (let y = 34; y < 41; y++) for (let x = 26; x < 38; x++) { const i = 4 * (y * 64 + x); sum += d[i] + d[i + 1] + d[i + 2]; n++; }
      window.__mouth.push([meta.expectedDisplayTime, sum / n / 3]);
    });
  };
})();
"""

INBOUND = """async (pc) => {
  const out = {};
  const report = await (pc || window.emo.pc).getStats();
  report.forEach((s) => { if (s.type === 'inbound-rtp') out[s.kind] = s; });
  return out;
}"""

LOOPBACK = """async ({thr, refr}) => {
  const mic = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 }, video: false });
  const a = new RTCPeerConnection(), b = new RTCPeerConnection();
  a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
  const remote = new MediaStream();
  const got = new Promise((r) => { b.ontrack = (e) => { remote.addTrack(e.track); r(); }; });
  mic.getAudioTracks().forEach((t) => a.addTrack(t, mic));
  await a.setLocalDescription(await a.createOffer()); await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(await b.createAnswer()); await a.setRemoteDescription(b.localDescription);
  await got;
  const el = new Audio(); el.srcObject = remote; await el.play();  // remote audio flows once an element plays it
  window.__lb = b;
  return await window.__tap({ mic, remote }, thr, refr);
}"""


def _burst(stimulus: str, tmp: Path) -> np.ndarray:
    """One burst, 48 kHz float32: a 60 ms 1 kHz tone, or the syllable "pa" (espeak-ng) that opens the mouth."""
    if stimulus == "beep":
        t = np.arange(int(RATE * BEEP_S)) / RATE
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.002)  # 2 ms edges: a sharp but click-free onset
        return (0.5 * np.sin(2 * np.pi * 1000 * t) * ramp).astype(np.float32)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("--stimulus speech needs espeak-ng")
    from emo_stream.media import load_audio

    raw = tmp / "pa.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), "pa."], check=True, capture_output=True)
    x = load_audio(raw, sample_rate=RATE)
    loud = np.flatnonzero(np.abs(x) > 0.02)
    x = x[loud[0]:loud[-1] + 1][:int(RATE * 0.6)]  # trimmed: the onset is the first sample
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def stimulus_wav(path: Path, stimulus: str, bursts: int) -> None:
    """`bursts` bursts, one every SPACING_S, 48 kHz mono PCM16; the fake device loops the file."""
    x = np.zeros(int(RATE * SPACING_S * bursts), np.float32)
    burst = _burst(stimulus, path.parent)
    for k in range(bursts):
        s = int(RATE * (0.5 + k * SPACING_S))
        x[s:s + len(burst)] = burst
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def mouth_offsets(remote_ms: list[float], mouth: list[list[float]], drop: float) -> list[float]:
    """For each remote audio onset (performance ms, as played out), when the avatar's mouth region first
    darkens by `drop` grey levels against the frames shown before it (its expectedDisplayTime), minus the
    audio onset: > 0 the lips move after the sound, < 0 before it. Bursts with no mouth reaction are skipped."""
    out = []
    for r in remote_ms:
        before = [v for t, v in mouth if r - 500 <= t < r - 200]
        if len(before) < 3:
            continue
        ref = float(np.median(before))
        hit = [t for t, v in mouth if r - 200 <= t <= r + 300 and ref - v > drop]
        if hit:
            out.append(hit[0] - r)
    return out


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = ["--host", "127.0.0.1", "--port", "0", "--backend", "preview"]
    if args.size:
        cmd += ["--size", str(args.size)]
    if args.segment_frames:
        cmd += ["--segment-frames", str(args.segment_frames)]
    return start_server_process(cmd, timeout=60)


def pair(mic: list[float], remote: list[float]) -> list[float]:
    """Latency (s) of each remote onset after the latest mic onset before it, within one beep spacing."""
    out = []
    for r in remote:
        before = [m for m in mic if 0 < r - m < SPACING_S * 0.9]
        if before:
            out.append(r - max(before))
    return out


def summary(lat: list[float]) -> dict:
    if not lat:
        return {"beeps": 0}
    seq = [round(x * 1000, 1) for x in lat]
    ms = sorted(seq)
    return {"beeps": len(ms), "p50": round(statistics.median(ms), 1),
            "p95": round(ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], 1),
            "min": round(ms[0], 1), "max": round(ms[-1], 1), "in_order": seq}


def jitter(stats: dict) -> dict:
    """Mean receive jitter-buffer delay (and video decode / processing delay) per emitted sample/frame, ms."""
    out = {}
    for kind, s in stats.items():
        n = s.get("jitterBufferEmittedCount") or 0
        if n:
            out[f"{kind}_jitter_buffer_ms"] = round(1000 * s["jitterBufferDelay"] / n, 1)
            if s.get("jitterBufferTargetDelay") is not None:
                out[f"{kind}_jitter_buffer_target_ms"] = round(1000 * s["jitterBufferTargetDelay"] / n, 1)
        if kind == "video" and s.get("framesDecoded"):
            out["video_decode_ms"] = round(1000 * s.get("totalDecodeTime", 0) / s["framesDecoded"], 1)
            if s.get("totalProcessingDelay") is not None:
                out["video_processing_ms"] = round(1000 * s["totalProcessingDelay"] / s["framesDecoded"], 1)
            out["video_frame_size"] = s.get("frameWidth")
    return out


def diff_stats(a: dict, b: dict) -> dict:
    """Stats counters over the measurement window only (b - a), so connection start-up is left out."""
    out = {}
    for kind in b:
        d = dict(b[kind])
        for key in ("jitterBufferDelay", "jitterBufferTargetDelay", "jitterBufferEmittedCount", "totalDecodeTime",
                    "totalProcessingDelay", "framesDecoded"):
            if key in d and key in a.get(kind, {}):
                d[key] = d[key] - a[kind][key]
        out[kind] = d
    return out


def measure(page, seconds: float, pc_expr: str | None) -> tuple[list[float], dict, list[float]]:
    stats_fn = INBOUND if pc_expr is None else INBOUND.replace("(pc || window.emo.pc)", pc_expr)
    s0 = page.evaluate(stats_fn)
    offsets = []  # audio - video estimated playout position (sender clock), ms
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        page.wait_for_timeout(500)
        if pc_expr is None:
            now = page.evaluate(stats_fn)
            a, v = now.get("audio", {}).get("estimatedPlayoutTimestamp"), now.get("video", {}).get(
                "estimatedPlayoutTimestamp")
            if a and v:
                offsets.append(a - v)
    s1 = page.evaluate(stats_fn)
    onsets = page.evaluate("window.__onsets")
    lat = pair(onsets["mic"], onsets["remote"])
    info = {"mic_onsets": len(onsets["mic"]), "remote_onsets": len(onsets["remote"]),
            "peaks": page.evaluate("window.__peaks"), **jitter(diff_stats(s0, s1))}
    return lat, info, offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=None, help="server frame size (default: the server's, 512)")
    parser.add_argument("--segment-frames", type=int, default=None, help="the server's engine segment size")
    parser.add_argument("--seconds", type=float, default=16.0, help="measurement window (one beep per 1.5 s)")
    parser.add_argument("--threshold", type=float, default=0.05, help="onset amplitude (beeps are 0.5)")
    parser.add_argument("--stimulus", choices=("beep", "speech"), default="beep",
                        help="mic bursts: 1 kHz beeps (sharpest onsets) or the spoken syllable 'pa' (opens the "
                             "avatar's mouth, so the on-screen lip offset is measured too)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the page-local WebRTC loopback baseline")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"needs Debian chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("browser_latency: time limit")))
    signal.alarm(HARD_LIMIT_S)
    proc, url = start_server(args)
    tmp = Path(tempfile.mkdtemp(prefix="emo-beeps-"))
    wav = tmp / "beeps.wav"
    stimulus_wav(wav, args.stimulus, bursts=10)
    cpu = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    result: dict = {"bench": "browser_latency", "device": cpu,
                    "backend": "preview", "size": args.size or "server default (512)",
                    "segment_frames": args.segment_frames or "config default", "stimulus": args.stimulus}
    refr = 0.5
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=BROWSER_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
            result["browser"] = f"chromium {browser.version}"
            # bypass_csp: the page's CSP (rightly) forbids the blob: worklet module the tap loads
            context = browser.new_context(permissions=["microphone"], bypass_csp=True)
            context.add_init_script(INIT_SCRIPT)
            page = context.new_page()
            page.goto(url + "/")
            page.click("button#start")
            page.wait_for_function("() => window.emo.state === 'live' && window.__mic", timeout=20000)
            page.wait_for_function("() => window.emo.frames > 10", timeout=20000)
            result["audio_context"] = page.evaluate(
                "([thr, refr]) => window.__tap("
                "{mic: window.__mic, remote: document.getElementById('avatar').srcObject}, thr, refr)",
                [args.threshold, refr])
            page.evaluate("window.__watchVideo(document.getElementById('avatar'))")
            lat, info, offsets = measure(page, args.seconds, None)
            to_perf = page.evaluate("window.__ctxToPerf()")
            remote_ms = [t * 1000 + to_perf for t in page.evaluate("window.__onsets.remote")]
            lips = mouth_offsets(remote_ms, page.evaluate("window.__mouth"), drop=3.0)
            result["lips_minus_audio_ms"] = {**summary([x / 1000 for x in lips]),
                                             "bursts_with_mouth_reaction": len(lips)}
            result["latency_ms"] = summary(lat)
            result["detail"] = info
            if offsets:
                result["av_playout_offset_ms"] = {"median": round(statistics.median(offsets), 1),
                                                  "min": round(min(offsets), 1), "max": round(max(offsets), 1)}
            page.wait_for_function("() => window.emo.stats && window.emo.stats.playout", timeout=5000)
            srv = page.evaluate("window.emo.stats")
            result["server_stats"] = {k: srv.get(k) for k in ("latency_ms", "fps", "input_queue_s",
                                                              "output_queue_frames", "late_frames")}
            result["server_stats"]["playout"] = {k: srv["playout"].get(k) for k in (
                "av_offset_ms", "behind_ms", "late_frames", "reanchors", "skipped_idle_frames")}
            page.click("button#stop")
            page.close()
            if args.baseline:
                # zero-work loopback: same fake mic, same browser, no server in the path
                lb = context.new_page()
                lb.goto(url + "/healthz")  # any page on the loopback origin (a secure context)
                lb.evaluate(LOOPBACK, {"thr": args.threshold, "refr": refr})
                lat_b, info_b, _ = measure(lb, min(args.seconds, 12.0), "window.__lb")
                result["baseline_loopback_latency_ms"] = summary(lat_b)
                result["baseline_detail"] = info_b
                lb.close()
            context.close()
            browser.close()
    finally:
        signal.alarm(0)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["method"] = (
        "fake mic plays 60 ms 1 kHz beeps every 1.5 s; an AudioWorklet on one AudioContext timestamps each onset "
        "(first sample over the threshold after >= 0.5 s quiet) on the mic stream app.js sent (getUserMedia wrapped) "
        "and on video#avatar's remote stream; latency = remote - mic onset. Excludes real capture / output device "
        "buffers (fake devices). jitter buffer = mean inbound-rtp jitterBufferDelay per emitted sample/frame over "
        "the window; av_playout_offset = audio - video estimatedPlayoutTimestamp. baseline = same measurement over "
        "a page-local RTCPeerConnection loopback (no server).")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
