"""Lips vs sound, measured exactly: the synctest pattern through every path a viewer can take.

The `synctest` backend (emo_stream/families/synctest) draws each frame from the audio it is sent with: a
flash whose grey level is that frame's mean |amplitude|, and a 16-bit frame counter. The stimulus is 200 ms
1 kHz beeps (one every 1.5 s, landing anywhere inside a frame). Where the flashes sit against the heard
beeps is the A/V offset (emo_stream/families/synctest/measure.py: per beep, the shift that best explains the
shown levels; the beep edges fall inside frames, so it resolves a fraction of a frame). > 0: picture late.

Paths (each `--paths` item):
    ws       the WebSocket bot API: JPEG frames with their audio; offset on the session's own timeline
    talk     real Chromium (Debian chromium, Playwright) on the talk page: the fake mic plays the beeps, the
             page's own WebRTC session sends them, the avatar's video and audio come back; flashes read
             from every displayed frame (requestVideoFrameCallback: expectedDisplayTime) and the sound from
             an AudioWorklet on the avatar's stream (AudioContext output time). Also the first frame: Start
             click to the first displayed frame.
    viewer   the OBS viewer page (/viewer?session=ID) on the talk page's session, in the same browser: its own
             WebRTC stream, measured the same way
    whep     a WHEP player (RTCPeerConnection + fetch POST /whep?session=ID, docs/whip.md) on the talk page's
             session, in the same browser: the standard-player path, measured the same way
    livekit  the LiveKit worker path through the in-process room stand-in (tests/livekit_standin.py): when each
             frame reaches the video source and each audio chunk leaves the audio source (no SFU, no codec)

    python bench/av_sync.py --paths ws,talk,viewer,livekit --runs 3 --out bench/results/av_sync-cpu.json
    python bench/av_sync.py --paths talk --repo /tmp/old-checkout     # the same measurement of other code

`--repo DIR` serves DIR's code (an older checkout, say): the synctest backend file of this checkout is
loaded into it by path, so the pattern is the same. Bounded: every browser step has a timeout, and the
whole run a hard limit (--limit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from _common import REPO, device_name, emit_json, load_average, start_server_process  # bench/; puts the repo on sys.path
from browser_page import BROWSER_ARGS, CHROMIUM, PAGE_KIT, heard_at  # noqa: F401  (bench/soak.py imports them here)
from emo_stream.families.synctest.measure import beeps, burst_offsets, offsets_of_frames, summary_ms
from server.serve_process import stop_serve_process

SYNCTEST_FILE = REPO / "emo_stream" / "families" / "synctest" / "backend.py"
FPS = 25
BEEP_EVERY_S = 1.5

# The server, from any checkout, with this checkout's synctest backend registered when it has none.
LAUNCH = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("emo_synctest_backend", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
argv = sys.argv[2:]
try:
    from emo_stream import backends as reg
except ImportError:   # a newer layout registers it itself
    reg = None
if reg is not None and hasattr(reg, "register_backend"):
    if "synctest" not in reg.backend_names():
        reg.register_backend("synctest", mod.create_backend, "A/V sync test pattern")
elif reg is not None:
    # a checkout from before the backend registry: its CLI knows preview and emo only, so the preview's name
    # stands for the pattern there
    reg.create_backend = lambda name=None, model=None, **kw: mod.create_backend(None, **kw)
    argv = [("preview" if a == "synctest" else a) for a in argv]
from server.cli import main
sys.exit(main(argv))
"""

# The page kit (bench/browser_page.py), plus: the sound envelope of a stream (__tapEnvelope), the synctest pattern
# of every displayed frame of a <video> (__watchPattern), the receivers' jitter buffers, the Start click's time.
INIT_SCRIPT = PAGE_KIT + r"""
(() => {
  window.__avs = { frames: [], meta: [], env: [], rx: [], lat: [], sync: [], clickAt: null };
  // each receiver's jitter-buffer delay, sampled every second: [performance ms, kind, delay s, emitted];
  // and Chromium's own view of the gap (audio minus video estimatedPlayoutTimestamp, > 0 the picture is late)
  // beside the page's lip-sync assist: [performance ms, gap ms, video target ms, audio target ms, aimed gap ms]
  setInterval(async () => {
    for (const pc of (window.__pcs || [])) {
      if (pc.connectionState !== 'connected') continue;
      const est = {};
      (await pc.getStats()).forEach((r) => {
        if (r.type !== 'inbound-rtp') return;
        window.__avs.rx.push([performance.now(), r.kind, r.jitterBufferDelay, r.jitterBufferEmittedCount]);
        est[r.kind] = r.estimatedPlayoutTimestamp;
      });
      const ls = window.emo && window.emo.lipSync;
      window.__avs.sync.push([performance.now(), est.audio && est.video ? est.audio - est.video : null,
                              ls ? ls.video_target_ms : null, ls ? ls.audio_target_ms : null, ls ? ls.aim_ms : null]);
    }
  }, 1000);
  // every peer connection the page makes, for its receivers' jitter-buffer figures (getStats)
  window.__pcs = [];
  const PC = window.RTCPeerConnection;
  if (PC) window.RTCPeerConnection = class extends PC { constructor(...a) { super(...a); window.__pcs.push(this); } };
  window.__rxStats = async () => {
    const out = {};
    for (const pc of window.__pcs) {
      if (pc.connectionState === 'closed') continue;
      (await pc.getStats()).forEach((r) => {
        if (r.type !== 'inbound-rtp') return;
        const n = r.jitterBufferEmittedCount || 0;
        out[r.kind] = { jitter_buffer_ms: n ? Math.round(1000 * r.jitterBufferDelay / n * 10) / 10 : null,
                        target_ms: n && r.jitterBufferTargetDelay ? Math.round(1000 * r.jitterBufferTargetDelay / n * 10) / 10 : null,
                        packets_lost: r.packetsLost, frames_dropped: r.framesDropped,
                        concealed: r.concealedSamples, removed_for_acceleration: r.removedSamplesForAcceleration,
                        inserted_for_deceleration: r.insertedSamplesForDeceleration };
      });
    }
    return out;
  };
  document.addEventListener('click', (e) => {
    if (e.target && e.target.id === 'start' && window.__avs.clickAt === null) window.__avs.clickAt = performance.now();
  }, true);
  const WORKLET = `
    class Env extends AudioWorkletProcessor {
      constructor() { super(); this.buf = []; }
      process(inputs) {
        const ch = inputs[0] && inputs[0][0];
        if (ch) {
          let s = 0; for (let i = 0; i < ch.length; i++) s += Math.abs(ch[i]);
          this.buf.push(currentTime, s / ch.length);
          if (this.buf.length >= 200) { this.port.postMessage(this.buf); this.buf = []; }
        }
        return true;
      }
    }
    registerProcessor('env', Env);`;
  window.__tapEnvelope = (stream) => window.__audioTap(WORKLET, 'env', { avatar: stream }, {},
    (key, buf) => { for (const v of buf) window.__avs.env.push(v); });
  // A second sound tap with no AudioContext of its own: the track's audio as Chromium hands it to its sinks
  // (MediaStreamTrackProcessor). A remote track's audio is handed out when the element's renderer pulls it
  // from the jitter buffer to play it, stamped with that time (AudioData.timestamp, microseconds of the
  // monotonic clock); the sound then reaches the device after the renderer's output delay (media-playout
  // stats). Started by av_sync only (bench/soak.py shares this script and never empties window.__avs.pull). window.__avs.pull: [timestamp ms, mean |x|] per 1 ms; pullClock: [timestamp ms, performance ms
  // when the page got the chunk] (their smallest difference maps the stamps onto the page clock).
  window.__tapPull = (stream) => {
    const track = stream.getAudioTracks()[0];
    if (!track || !window.MediaStreamTrackProcessor) return;
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    window.__avs.pull = []; window.__avs.pullClock = [];
    (async () => {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        const got = performance.now();
        try {
          const n = value.numberOfFrames, rate = value.sampleRate, ts = value.timestamp / 1000;
          const x = new Float32Array(n);
          value.copyTo(x, { planeIndex: 0, format: 'f32-planar' });
          const blk = Math.max(1, Math.round(rate / 1000));
          for (let i = 0; i + blk <= n; i += blk) {
            let s = 0; for (let j = i; j < i + blk; j++) s += Math.abs(x[j]);
            window.__avs.pull.push(ts + 1000 * i / rate, s / blk);
          }
          window.__avs.pullClock.push(ts, got);
        } catch (e) { window.__avs.pullError = String(e); } finally { value.close(); }
      }
    })();
  };
  // synctest pattern of every displayed frame, read at 64x64 (read_pattern in backend.py, in JS)
  window.__watchPattern = (video) => {
    const grey = (d, x, y) => { const i = 4 * (y * 64 + x); return (d[i] + d[i + 1] + d[i + 2]) / 3; };
    const mean = (d, y0, y1, x0, x1) => { let s = 0, n = 0;
      for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) { s += grey(d, x, y); n++; } return s / n; };
    window.__eachShownFrame(video, (d, meta) => {
      const level = mean(d, 12, 36, 16, 48) / 255;
      let counter = 0;
      for (let b = 0; b < 16; b++) {
        const r = Math.floor(b / 8), col = b % 8, y0 = 48 + 8 * r, x0 = 8 * col;
        counter = counter * 2 + (mean(d, y0 + 2, y0 + 6, x0 + 2, x0 + 6) > 127.5 ? 1 : 0);
      }
      window.__avs.frames.push([meta.expectedDisplayTime, level, counter, meta.presentedFrames]);
      // the same frame on the other clocks: handed to the compositor, its last packet received, callback time
      // (kept aligned with frames; bounded where a caller empties frames only, as bench/soak.py does)
      const m = window.__avs.meta;
      if (m.length < window.__avs.frames.length) m.push([meta.presentationTime, meta.receiveTime || 0, meta.rtpTimestamp || 0, performance.now()]);
    });
  };
  // The sound tap's own latency, sampled all along: the context's output latency (what getOutputTimestamp's
  // mapping already includes) and what Chromium says the avatar element's audio output adds (media-playout
  // stats: the element's sound reaches the device that much after NetEq hands it out)
  setInterval(async () => {
    const ctx = window.__ctx;
    if (!ctx) return;
    const row = [performance.now(), ctx.baseLatency || 0, ctx.outputLatency || 0, null];
    for (const pc of (window.__pcs || [])) {
      if (pc.connectionState !== 'connected') continue;
      (await pc.getStats()).forEach((r) => {
        if (r.type === 'media-playout' && r.totalSamplesCount) row[3] = r.totalPlayoutDelay / r.totalSamplesCount;
      });
      break;
    }
    window.__avs.lat.push(row);
  }, 1000);
})();
// First frame, stage by stage: every step from the Start click to the first shown frame, on the page's clock
// (window.__stages: [name, performance ms]); the first peer connection's first packets and decoded frame are
// polled from getStats every 10 ms until its first frame is decoded.
(() => {
  const stages = window.__stages = [];
  const mark = (name) => { if (!stages.some((s) => s[0] === name)) stages.push([name, performance.now()]); };
  window.__mark = mark;
  const f = window.fetch;
  window.fetch = async (...a) => { const u = String(a[0]).replace(/\?.*/, ''); mark('fetch ' + u);
    const r = await f(...a); mark('fetched ' + u); return r; };
  const md = navigator.mediaDevices;
  if (md && md.getUserMedia) {
    const gum = md.getUserMedia.bind(md);
    md.getUserMedia = async (c) => { mark('getUserMedia'); const s = await gum(c); mark('got mic'); return s; };
  }
  const WS = window.WebSocket;
  window.WebSocket = class extends WS {
    constructor(...a) { super(...a); mark('ws new'); this.addEventListener('open', () => mark('ws open'));
      this.addEventListener('message', (e) => { if (typeof e.data === 'string' && e.data.includes('"session_started"')) mark('session_started received'); }); }
    send(d) { if (typeof d === 'string' && d.includes('"type":"start"')) mark('start sent'); return super.send(d); }
  };
  const PC = window.RTCPeerConnection;
  let first = null;
  window.RTCPeerConnection = class extends PC {
    constructor(...a) {
      super(...a);
      if (first) return;
      first = this;
      mark('pc created');
      this.addEventListener('icegatheringstatechange', () => mark('ice gathering ' + this.iceGatheringState));
      this.addEventListener('icecandidate', (e) => mark(e.candidate ? 'first local candidate' : 'last local candidate'));
      this.addEventListener('iceconnectionstatechange', () => mark('ice ' + this.iceConnectionState));
      this.addEventListener('connectionstatechange', () => mark('connection ' + this.connectionState));
      this.addEventListener('track', (e) => {
        mark('track ' + e.track.kind);
        // a remote track's sound reaches its sinks when the element's renderer first pulls it out of the
        // jitter buffer: what arrived before that waits there (a deep start)
        if (e.track.kind !== 'audio' || !window.MediaStreamTrackProcessor) return;
        const reader = new MediaStreamTrackProcessor({ track: e.track }).readable.getReader();
        reader.read().then(() => { mark('first audio pulled for playout'); reader.cancel(); }, () => {});
      });
      const poll = async () => {
        if (this.connectionState === 'closed') return;
        let decoded = false;
        (await this.getStats()).forEach((r) => {
          if (r.type === 'inbound-rtp' && r.packetsReceived > 0) mark('first ' + r.kind + ' packet (by 10 ms)');
          if (r.type === 'inbound-rtp' && r.kind === 'video' && r.framesDecoded > 0) { decoded = true; mark('first video frame decoded (by 10 ms)'); }
          if (r.type === 'remote-outbound-rtp') mark('first ' + r.kind + ' sender report (by 10 ms)');
        });
        if ((!decoded || !stages.some((s) => s[0].startsWith('first audio sender'))) && performance.now() < until) setTimeout(poll, 10);
      };
      const until = performance.now() + 15000;
      const poll0 = poll;
      setTimeout(function again() { if (performance.now() < until) poll0(); }, 10);
    }
    async createOffer(...a) { const o = await super.createOffer(...a); if (this === first) mark('offer created'); return o; }
    async setLocalDescription(...a) { const r = await super.setLocalDescription(...a); if (this === first) mark('local description set'); return r; }
    async setRemoteDescription(...a) { if (this === first) mark('answer received'); const r = await super.setRemoteDescription(...a);
      if (this === first) mark('remote description set'); return r; }
  };
})();
"""

def beeps_wav(path: Path, seconds: float = 30.0) -> None:
    """The fake mic's file (it loops): 200 ms 1 kHz beeps every 1.5 s, 48 kHz mono PCM16."""
    x = beeps(seconds, rate=48000, every_s=BEEP_EVERY_S - 0.0071, first_s=0.5)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def server_config(tmp: Path, video_delay_ms: float | None = None, video_hold_ms: float | None = None) -> Path:
    """vad off: a tone is no speech to silero-vad, and the flash is drawn only for what the detector hears."""
    path = tmp / "server.yaml"
    text = "engine:\n  vad: false\n"
    playout = {"webrtc_video_delay_ms": video_delay_ms, "webrtc_video_hold_ms": video_hold_ms}
    if any(v is not None for v in playout.values()):
        text += "playout:\n" + "".join(f"  {k}: {v}\n" for k, v in playout.items() if v is not None)
    path.write_text(text)
    return path


def start_server(repo: Path, tmp: Path, size: int, extra: list[str] | None = None,
                 video_delay_ms: float | None = None, video_hold_ms: float | None = None) -> tuple[subprocess.Popen, str]:
    """A synctest server with the code of the checkout `repo` (LAUNCH registers the pattern backend there)."""
    args = ["--host", "127.0.0.1", "--port", "0", "--backend", "synctest", "--size", str(size),
            "--config", str(server_config(tmp, video_delay_ms, video_hold_ms)), *(extra or [])]
    return start_server_process(args, repo=repo, timeout=90, entry=("-c", LAUNCH, str(SYNCTEST_FILE)))


# ---- WebSocket API ------------------------------------------------------------------------------------------
async def ws_run(url: str, seconds: float) -> dict:
    from server.bot_client import BotClient, ReceivedFrame

    x = beeps(seconds, every_s=BEEP_EVERY_S - 0.0071)
    t_request = time.monotonic()
    async with BotClient(url) as bot:
        await bot.start(sample_rate=16000, frames="jpeg")
        first_frame = None
        frames = []

        async def send() -> None:   # real time, 20 ms messages, as a voice pipeline sends
            for i in range(0, len(x), 320):
                await bot.send_audio(x[i:i + 320])
                await asyncio.sleep(0.02)
            await bot.end_segment()

        sender = asyncio.create_task(send())
        try:
            async for item in bot.receive(timeout=20):
                if isinstance(item, ReceivedFrame):
                    if first_frame is None:
                        first_frame = time.monotonic() - t_request
                    if item.speech:
                        frames.append(item)
                elif item.get("type") == "playback_finished" and sender.done():
                    break   # the last utterance (real-time input also ends one whenever the input runs dry)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await bot.stop()
    offsets = offsets_of_frames(frames, FPS)
    return {**summary_ms(offsets), "speech_frames": len(frames),
            "first_frame_ms": round(1000 * first_frame, 1) if first_frame else None}


# ---- Chromium: talk page and viewer page ---------------------------------------------------------------------
def _page_offsets(page) -> tuple[dict, list]:
    avs = page.evaluate("window.__avs")
    to_perf = page.evaluate("window.__ctxToPerf()")
    env = np.asarray(avs["env"], float).reshape(-1, 2)
    frames = np.asarray(avs["frames"], float).reshape(-1, 4)
    if len(env) < 10 or len(frames) < 10:
        return {"bursts": 0, "fitted": 0, "frames_shown": len(frames)}, []
    ctx_map = np.asarray(page.evaluate("window.__clockMap"), float).reshape(-1, 2)
    et = heard_at(env[:, 0], ctx_map, to_perf)
    if len(ctx_map) >= 2:
        slope, icpt = np.polyfit(ctx_map[:, 0], ctx_map[:, 1], 1)
    ft = frames[:, 0] / 1000.0
    counters = frames[:, 2].astype(int)
    steps = np.diff(counters) % 65536
    born = next((t for name, t in page.evaluate("window.__stages") if name == "pc created"), None)

    def fitted(offsets) -> dict:   # the summary, plus each beep: [s since this page's peer connection, ms, score]
        out = summary_ms(offsets)
        out.pop("in_order_ms", None)
        out["beeps"] = [[round(o.onset - born / 1000, 2) if born is not None else None, round(1000 * o.offset, 1),
                         round(o.score, 3)] for o in offsets]
        return out

    # tap 1: the AudioWorklet in a second AudioContext, its time mapped through getOutputTimestamp samples
    context_offsets = burst_offsets(ft, frames[:, 1], et, env[:, 1], 1.0 / FPS)
    context_tap = fitted(context_offsets)
    # tap 2: the sound as the element's renderer pulls it (MediaStreamTrackProcessor stamps) plus the
    # renderer's output delay; no second audio clock involved
    pull_tap = None
    pull = np.asarray(avs.get("pull") or [], float).reshape(-1, 2)
    pclock = np.asarray(avs.get("pullClock") or [], float).reshape(-1, 2)
    if len(pull) > 10 and len(pclock) > 10:
        lag = pclock[:, 1] - pclock[:, 0]          # page time the chunk arrived minus its stamp
        to_page = float(lag.min())                 # the fastest delivery: the stamp's clock on the page's
        delay = [r[3] for r in (avs.get("lat") or []) if r and r[3] is not None]
        out_delay = float(np.median(delay)) if delay else 0.0
        heard = (pull[:, 0] + to_page) / 1000.0 + out_delay
        pull_tap = {**fitted(burst_offsets(ft, frames[:, 1], heard, pull[:, 1], 1.0 / FPS)),
                    "output_delay_ms": round(1000 * out_delay, 1),
                    "delivery_ms": [round(float(np.percentile(lag - to_page, q)), 1) for q in (50, 95)],
                    "stamp_rate_vs_page": round(float(np.polyfit(pclock[:, 0], pclock[:, 1], 1)[0]), 6)}
    # The pull tap is the figure where it works: the second AudioContext's clock ran 1-14 % off the page's
    # with jumps of seconds whenever Chromium's audio service was starved (audio_clock below), and its sound
    # reaches the worklet through one more buffer than the element's. The context tap stays as a cross-check.
    primary = pull_tap if pull_tap and pull_tap.get("fitted") else context_tap
    out = {k: v for k, v in primary.items() if k != "beeps"}
    out["in_order_ms"] = [b[1] for b in primary["beeps"] if b[2] >= 0.8]
    out["beeps"] = primary["beeps"]
    out["sound_tap"] = "pull" if primary is pull_tap else "context"
    out["context_tap"] = context_tap
    if pull_tap:
        out["pull_tap"] = {k: v for k, v in pull_tap.items() if k != "beeps"}
    elif avs.get("pullError"):
        out["pull_tap"] = {"error": avs["pullError"]}
    offsets = context_offsets
    meta = np.asarray(avs.get("meta") or [], float).reshape(-1, 4)
    if len(meta) == len(frames):
        # expectedDisplayTime (what the offsets use) minus presentationTime (when the frame was handed to the
        # compositor): how much the choice of video clock moves every offset
        out["expected_minus_presented_ms"] = [round(float(np.percentile(frames[:, 0] - meta[:, 0], q)), 1)
                                              for q in (5, 50, 95)]
        got = meta[:, 1] > 0
        if got.any():   # receive (last packet) to expected display: the video's path inside Chromium
            out["received_to_display_ms"] = [round(float(np.percentile((frames[got, 0] - meta[got, 1]), q)), 1)
                                             for q in (5, 50, 95)]
    lat = [r for r in (avs.get("lat") or []) if r]
    if lat:
        col = lambda i: [r[i] for r in lat if r[i] is not None]   # noqa: E731
        out["sound_path_ms"] = {
            "tap_context_base_latency": round(1000 * float(np.median(col(1))), 1) if col(1) else None,
            "tap_context_output_latency": round(1000 * float(np.median(col(2))), 1) if col(2) else None,
            "element_playout_delay": round(1000 * float(np.median(col(3))), 1) if col(3) else None}
    out["receiver"] = page.evaluate("window.__rxStats()")
    if len(ctx_map) >= 2:
        resid = ctx_map[:, 1] - (ctx_map[:, 0] * slope + icpt)
        out["audio_clock"] = {"rate_vs_page": round(float(slope) / 1000, 6),
                              "mapping_residual_ms": [round(float(resid.min()), 1), round(float(resid.max()), 1)],
                              "end_mapping_minus_fit_ms": round(float(to_perf - icpt), 1)}
    rx = avs.get("rx") or []
    series = {}
    for kind in ("audio", "video"):   # jitter-buffer delay per second, from the cumulative counters
        pts = [(t, d, n) for t, k, d, n in rx if k == kind and n]
        series[kind] = [round(1000 * (d1 - d0) / (n1 - n0), 1) for (_, d0, n0), (_, d1, n1) in zip(pts, pts[1:])
                        if n1 > n0]
    out["jitter_buffer_ms_per_s"] = series
    sync = avs.get("sync") or []
    out["chromium_gap_ms_per_s"] = [None if g is None else round(g, 1) for _, g, *_ in sync]
    out["lip_sync_video_target_ms_per_s"] = [row[2] for row in sync]
    out["lip_sync_audio_target_ms_per_s"] = [row[3] for row in sync]
    out["lip_sync_aim_ms_per_s"] = [row[4] for row in sync]
    out.update({"frames_shown": int(len(frames)),
                "counter_repeats": int((steps == 0).sum()), "counter_skips": int((steps > 1).sum()),
                "shown_fps": round(float((len(ft) - 1) / (ft[-1] - ft[0])), 2) if len(ft) > 1 else None})
    return out, offsets


# A WHEP player in a page of the server's origin (same-origin fetch: the benchmark's server has no token).
WHEP_PLAY = r"""async (session) => {
  document.body.innerHTML = '<video id="avatar" autoplay playsinline></video>';
  const pc = window.__whep = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const stream = new MediaStream();
  pc.ontrack = (e) => { stream.addTrack(e.track); document.getElementById('avatar').srcObject = stream; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => pc.iceGatheringState === 'complete' ? ok()
    : pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && ok()));
  const r = await fetch('/whep?session=' + session, {method: 'POST', body: pc.localDescription.sdp,
                                                    headers: {'Content-Type': 'application/sdp'}});
  if (r.status !== 201) throw new Error('WHEP ' + r.status + ': ' + await r.text());
  await pc.setRemoteDescription({type: 'answer', sdp: await r.text()});
  return r.headers.get('Location');
}"""


def _player_page(browser, url: str, session: str, whep: bool, video_target_ms: float | None = None,
                 page_query: str = ""):
    """A second window watching the talk page's session: the viewer page, or a WHEP player."""
    context = browser.new_context(bypass_csp=True)
    context.add_init_script(INIT_SCRIPT)
    if video_target_ms is not None:
        context.add_init_script(VIDEO_TARGET % video_target_ms)
    page = context.new_page()
    if whep:
        page.goto(f"{url}/healthz")   # any page of the server's origin
        page.evaluate(WHEP_PLAY, session)
    else:
        page.goto(f"{url}/viewer?session={session}" + (f"&{page_query}" if page_query else ""))
    page.evaluate("window.__watchPattern(document.getElementById('avatar'))")
    page.wait_for_function("() => window.__avs.frames.length > 10", timeout=30000)
    page.evaluate("(() => { const s = document.getElementById('avatar').srcObject; window.__tapPull(s); return window.__tapEnvelope(s); })()")
    return page


# --raw-mic: the talk page's mic without Chromium's echo canceller, noise suppressor and gain control (an
# experiment: does the capture side's processing move the talk page's lip sync?)
RAW_MIC = r"""(() => { const md = navigator.mediaDevices; const gum = md.getUserMedia.bind(md);
  md.getUserMedia = (c) => gum({ ...c, audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } }); })();"""


# --video-target-ms (experiment): every page's video receivers get this jitterBufferTarget
VIDEO_TARGET = r"""(() => { const PC = window.RTCPeerConnection; window.RTCPeerConnection = class extends PC {
  constructor(...a) { super(...a); this.addEventListener('track', (e) => {
    if (e.track.kind === 'video' && 'jitterBufferTarget' in e.receiver) e.receiver.jitterBufferTarget = %s; }); } }; })();"""


def browser_run(url: str, wav: Path, seconds: float, viewer: bool, whep: bool = False, settle: float = 0.0,
                raw_mic: bool = False, video_target_ms: float | None = None, page_query: str = "") -> dict:
    from playwright.sync_api import sync_playwright

    result: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=BROWSER_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
        result["browser"] = f"chromium {browser.version}"
        context = browser.new_context(permissions=["microphone"], bypass_csp=True)  # the worklet is a blob: module
        context.add_init_script(INIT_SCRIPT)
        if raw_mic:
            context.add_init_script(RAW_MIC)
        if video_target_ms is not None:
            context.add_init_script(VIDEO_TARGET % video_target_ms)
        try:
            page = context.new_page()
            page.goto(url + "/" + (f"?{page_query}" if page_query else ""))
            page.evaluate("window.__watchPattern(document.getElementById('avatar'))")
            page.click("button#start")
            page.wait_for_function("() => window.emo.state === 'live' && window.__avs.frames.length > 0", timeout=30000)
            first = page.evaluate("window.__avs.frames[0][0] - window.__avs.clickAt")
            page.wait_for_timeout(300)   # the 10 ms stats poll's last stages
            stages = page.evaluate("(() => { const c = window.__avs.clickAt; const f = window.__avs.frames[0];"
                                   " const m = window.__avs.meta[0]; return window.__stages.map(([n, t]) => [n, t - c])"
                                   ".concat([['first frame presented', m[0] - c], ['first frame expected display', f[0] - c]])"
                                   ".sort((a, b) => a[1] - b[1]); })()")
            page.wait_for_function("() => window.emo.frames > 10", timeout=20000)
            page.evaluate("(() => { const s = document.getElementById('avatar').srcObject; window.__tapPull(s); return window.__tapEnvelope(s); })()")
            session = page.evaluate("window.emo.session || (window.emo.stats && window.emo.stats.session) || null") or "latest"
            # each player in its own context (window): a second tab of one window would hide the talk page
            players = {name: _player_page(browser, url, session, whep=name == "whep", video_target_ms=video_target_ms,
                                          page_query=page_query)
                       for name, on in (("viewer", viewer), ("whep", whep)) if on}
            # Opening a window costs a burst of CPU: on 2 cores that delays packets, Chromium's audio jitter
            # buffer jumps (~250 ms) and its lip sync takes 5-10 s to follow. The window starts after that.
            page.wait_for_timeout(int(settle * 1000))
            # measure from here: every page's frames and sound so far are dropped
            for p in [page, *players.values()]:
                p.evaluate("window.__avs.frames = []; window.__avs.meta = []; window.__avs.env = []; window.__avs.rx = []; window.__avs.sync = []; window.__avs.lat = []; window.__avs.pull = []; window.__avs.pullClock = []; window.__avs.windowAt = performance.now()")
            page.wait_for_timeout(int(seconds * 1000))
            talk, _ = _page_offsets(page)
            result["talk"] = {**talk, "first_frame_ms": round(first, 1),
                              "first_frame_stages_ms": [[n, round(t, 1)] for n, t in stages]}
            for name, p in players.items():
                result[name], _ = _page_offsets(p)
                p.close()
            srv = page.evaluate("window.emo.stats") or {}
            result["server_playout"] = srv.get("playout") or {}
            if page.locator("button#stop").is_enabled():   # (a session the server ended has nothing to stop)
                page.click("button#stop")
            else:
                result["talk"]["ended_early"] = True
        finally:
            context.close()
            browser.close()
    return result


# ---- LiveKit worker path (in-process room stand-in) ----------------------------------------------------------
async def livekit_run(seconds: float, size: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from livekit import rtc
    from livekit.agents.voice.avatar import DataStreamAudioOutput
    from livekit_standin import Hub, LoopThread, StandInRoom

    from emo_stream.registry import create_backend
    from emo_stream.families.synctest.backend import read_pattern
    from emo_stream.livekit.host import EngineHost
    from emo_stream.livekit.job import run_avatar_job
    from emo_stream.livekit.metadata import DispatchInfo
    from emo_stream.streaming import EngineConfig, StreamingEngine

    rate = 24000
    agent = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    host = EngineHost(StreamingEngine(create_backend("synctest", size=size),
                                      EngineConfig(max_sessions=1, segment_frames=1, vad=False)))
    await host.start()
    avatar = await host.prepare_avatar("default", lambda: np.zeros((64, 64, 3), np.uint8))
    hub = Hub()
    info = DispatchInfo(avatar_identity="avatar-0", sender_identity="agent-0", sample_rate=rate)
    worker_room = StandInRoom(hub, "room-0", info.avatar_identity, kind=agent)
    agent_room = StandInRoom(hub, "room-0", "agent-0", kind=agent)
    thread = LoopThread("job-0")
    frames: list[tuple[float, float]] = []     # (time the frame reaches the video source, flash level)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    assert host.reserve()

    def on_started(runner, generator) -> None:
        source = runner.av_sync._video_source     # private: stamps each captured frame (as bench/livekit_worker.py)
        capture = source.capture_frame

        def stamped(frame, *a, **k):
            t = time.monotonic()
            rgba = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 4)
            frames.append((t, read_pattern(rgba[:, :, :3])[0]))
            return capture(frame, *a, **k)

        source.capture_frame = stamped
        loop.call_soon_threadsafe(started.set)

    async def job() -> None:
        await worker_room.connect()
        await run_avatar_job(worker_room, host, info, avatar, on_started=on_started)

    done = thread.submit(job())
    await agent_room.connect()
    out = DataStreamAudioOutput(agent_room, destination_identity=info.avatar_identity, sample_rate=rate,
                                wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True)
    await started.wait()
    while len(worker_room.published) < 2:
        await asyncio.sleep(0.01)
    track = next(p.track for p in worker_room.published if p.kind == rtc.TrackKind.KIND_AUDIO)
    env_t: list[np.ndarray] = []
    env_v: list[np.ndarray] = []

    async def tap() -> None:   # when each 10 ms chunk leaves the audio source, split in 1 ms blocks
        stream = rtc.AudioStream(track, sample_rate=rate, num_channels=1)
        try:
            async for ev in stream:
                t = time.monotonic()
                x = np.abs(np.frombuffer(ev.frame.data, np.int16).astype(np.float32) / 32768)
                n = len(x) // 24
                env_v.append(x[:n * 24].reshape(n, 24).mean(axis=1))
                env_t.append(t - len(x) / rate + np.arange(n) * 24 / rate)
        finally:
            await stream.aclose()

    tapper = asyncio.ensure_future(tap())
    x = (beeps(seconds, rate=rate, every_s=BEEP_EVERY_S - 0.0071) * 32767).astype(np.int16)
    for i in range(0, len(x), 480):   # the agent's TTS pushes 20 ms frames as fast as it may
        part = x[i:i + 480]
        await out.capture_frame(rtc.AudioFrame(part.tobytes(), rate, 1, len(part)))
    out.flush()
    await out.wait_for_playout()
    await asyncio.sleep(0.3)
    tapper.cancel()
    await asyncio.gather(tapper, return_exceptions=True)
    await thread.submit(worker_room.disconnect())
    await done
    thread.close()
    await host.stop()
    ft = np.array([t for t, _ in frames])
    fl = np.array([v for _, v in frames])
    offsets = burst_offsets(ft, fl, np.concatenate(env_t), np.concatenate(env_v), 1.0 / FPS)
    return {**summary_ms(offsets), "frames": len(frames),
            "note": "frames as they reach the video source vs audio as it leaves the audio source; no SFU or codec"}


# ---- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="ws,talk,viewer,whep,livekit",
                        help="comma list of ws, talk, viewer, whep, livekit")
    parser.add_argument("--runs", type=int, default=3, help="repeat each path (fresh server and browser each run)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measurement window per run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--settle", type=float, default=10.0,
                        help="browser paths: seconds between the last window opening and the measurement window")
    parser.add_argument("--repo", default=None, help="serve this checkout's code instead (browser and ws paths)")
    parser.add_argument("--video-delay-ms", type=float, default=None,
                        help="the server's playout.webrtc_video_delay_ms (default: the server's own default)")
    parser.add_argument("--video-hold-ms", type=float, default=None,
                        help="the server's playout.webrtc_video_hold_ms (default: the server's own default)")
    parser.add_argument("--settled-after", type=float, default=20.0,
                        help="browser paths: beeps this many seconds after the page's peer connection was made "
                             "count as settled (Chromium's lip sync converges over 5-20 s); the rest as start-up")
    parser.add_argument("--video-target-ms", type=float, default=None,
                        help="experiment: set every page's video receivers' jitterBufferTarget to this")
    parser.add_argument("--no-lip-sync", action="store_true",
                        help="our pages without their lip-sync assist (?lipsync=0): Chromium's synchronizer alone")
    parser.add_argument("--raw-mic", action="store_true",
                        help="talk page: capture the mic without echo cancelling, noise suppression, gain control")
    parser.add_argument("--label", default=None, help="a name for this code in the JSON (default: its git commit)")
    parser.add_argument("--limit", type=int, default=900, help="hard time limit of the whole run, seconds")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - {"ws", "talk", "viewer", "whep", "livekit"}
    if unknown:
        raise SystemExit(f"unknown path(s): {', '.join(sorted(unknown))}")
    if {"talk", "viewer", "whep"} & set(paths) and not Path(CHROMIUM).exists():
        raise SystemExit(f"the talk, viewer and whep paths need Debian chromium at {CHROMIUM}")
    repo = Path(args.repo).resolve() if args.repo else REPO
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("av_sync: time limit")))
    signal.alarm(args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="emo-avsync-"))
    wav = tmp / "beeps.wav"
    beeps_wav(wav)
    runs: dict[str, list] = {p: [] for p in paths}
    loads = [load_average()]
    try:
        for run in range(args.runs):
            if {"ws", "talk", "viewer", "whep"} & set(paths):
                proc, url = start_server(repo, tmp, args.size, video_delay_ms=args.video_delay_ms,
                                         video_hold_ms=args.video_hold_ms)
                try:
                    if "ws" in paths:
                        runs["ws"].append(asyncio.run(ws_run(url, args.seconds)))
                    if {"talk", "viewer", "whep"} & set(paths):
                        got = browser_run(url, wav, args.seconds, viewer="viewer" in paths, whep="whep" in paths,
                                          settle=args.settle, raw_mic=args.raw_mic,
                                          video_target_ms=args.video_target_ms,
                                          page_query="lipsync=0" if args.no_lip_sync else "")
                        for p in ("talk", "viewer", "whep"):
                            if p in paths and p in got:
                                runs[p].append({**got[p], "server_playout": got.get("server_playout"),
                                                "browser": got.get("browser")})
                finally:
                    stop_serve_process(proc)
            if "livekit" in paths:
                runs["livekit"].append(asyncio.run(livekit_run(args.seconds, args.size)))
            loads.append(load_average())
            print(f"run {run + 1}/{args.runs}: " + "; ".join(
                f"{p} {runs[p][-1].get('median_ms')} ms" for p in paths if runs[p]), file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)

    def medians(key: str, items: list) -> list:
        return [r.get(key) for r in items if r.get(key) is not None]

    def part(items: list, settled: bool) -> list:
        """Each run's median over its settled (or start-up) beeps: [s since the peer connection, ms, score]."""
        out = []
        for r in items:
            got = [b[1] for b in r.get("beeps") or [] if b[0] is not None and b[2] >= 0.8
                   and (b[0] >= args.settled_after) == settled]
            out.append(round(statistics.median(got), 1) if got else None)
        return out

    def browser_summary(p: str) -> dict:
        if p not in ("talk", "viewer", "whep"):
            return {}
        settled = part(runs[p], True)
        have = [m for m in settled if m is not None]
        return {"settled_run_medians_ms": settled, "startup_run_medians_ms": part(runs[p], False),
                "median_of_settled_run_medians_ms": round(statistics.median(have), 1) if have else None,
                "context_tap_run_medians_ms": [(r.get("context_tap") or {}).get("median_ms") for r in runs[p]]}

    result = {
        "bench": "av_sync",
        "device": device_name(detail=f"{os.cpu_count()} cores, shared with other engineers' work"),
        "code": args.label or commit, "repo": str(repo), "backend": "synctest", "size": args.size,
        "seconds_per_run": args.seconds, "runs": args.runs, "settle_s": args.settle,
        "webrtc_video_delay_ms": args.video_delay_ms if args.video_delay_ms is not None else "server default",
        "webrtc_video_hold_ms": args.video_hold_ms if args.video_hold_ms is not None else "server default",
        "settled_after_s": args.settled_after,
        "raw_mic": args.raw_mic, "video_target_ms": args.video_target_ms, "lip_sync_assist": not args.no_lip_sync,
        "stimulus": "200 ms 1 kHz beeps every 1.5 s (mic: 48 kHz WAV looped by Chromium's fake device)",
        "summary": {p: {"median_of_run_medians_ms": (round(statistics.median(medians("median_ms", runs[p])), 1)
                                                     if medians("median_ms", runs[p]) else None),
                        "run_medians_ms": medians("median_ms", runs[p]),
                        "first_frame_ms": medians("first_frame_ms", runs[p]) or None, **browser_summary(p)}
                    for p in paths},
        "runs_detail": runs,
        "load_average": loads,
        "command": "python " + " ".join(sys.argv),
        "sign": "offset = flash shown minus the same audio heard; > 0 the picture is late",
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
