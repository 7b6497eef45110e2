"""What the browser benches share (bench/av_sync.py, bench/browser_latency.py, bench/soak.py): Debian chromium and
its flags, and the page kit every measured page gets before its own scripts run.

The page kit (PAGE_KIT, a Playwright init script):
    window.__mic                  the stream the page captured (getUserMedia wrapped): the one it sends
    window.__audioTap(src, name, streams, options, onMessage)
                                  one AudioContext (48 kHz, interactive) running the AudioWorklet processor
                                  `name` (source `src`) on each stream, silent to the speakers; onMessage(stream
                                  name, data) gets what each processor posts. Samples the context's clock against
                                  the page's every 200 ms into window.__clockMap ([contextTime, performanceTime]
                                  pairs, one context at a time); window.__ctxToPerf() is the mapping now
    window.__eachShownFrame(video, fn)
                                  fn(pixels64x64 RGBA, meta) for every frame the <video> displays
                                  (requestVideoFrameCallback: meta.expectedDisplayTime is on the page's clock)
`heard_at` turns AudioContext times into page times through those clock samples.
"""

from __future__ import annotations

import numpy as np

CHROMIUM = "/usr/bin/chromium"

BROWSER_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
                # several pages (talk, viewer, WHEP) measured at once: none may be throttled as a background tab
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows"]

PAGE_KIT = r"""
(() => {
  const md = navigator.mediaDevices;
  if (md && md.getUserMedia) {
    const orig = md.getUserMedia.bind(md);
    md.getUserMedia = async (c) => { const s = await orig(c); window.__mic = s; return s; };
  }
  window.__clockMap = [];
  window.__audioTap = async (src, name, streams, options, onMessage) => {
    const ctx = new AudioContext({ sampleRate: 48000, latencyHint: 'interactive' });
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([src], { type: 'text/javascript' })));
    await ctx.resume();
    const sink = ctx.createGain(); sink.gain.value = 0; sink.connect(ctx.destination);
    for (const [key, stream] of Object.entries(streams)) {
      const node = new AudioWorkletNode(ctx, name, { processorOptions: options || {} });
      node.port.onmessage = (e) => onMessage(key, e.data);
      ctx.createMediaStreamSource(stream).connect(node);
      node.connect(sink);
    }
    window.__ctx = ctx;
    // the context's clock against the page's, sampled all along: one mapping taken at the end would turn any
    // rate difference between the audio device's clock and performance.now() into a drift
    window.__clockMap = [];
    if (window.__clockTimer) clearInterval(window.__clockTimer);
    window.__clockTimer = setInterval(() => {
      const o = ctx.getOutputTimestamp();
      if (o.contextTime > 0) window.__clockMap.push(o.contextTime, o.performanceTime);
    }, 200);
    return { sampleRate: ctx.sampleRate, baseLatency: ctx.baseLatency, outputLatency: ctx.outputLatency || 0 };
  };
  // context seconds -> performance ms at which that sample leaves the output (now)
  window.__ctxToPerf = () => { const o = window.__ctx.getOutputTimestamp(); return o.performanceTime - 1000 * o.contextTime; };
  window.__eachShownFrame = (video, fn) => {
    const c = document.createElement('canvas'); c.width = 64; c.height = 64;
    const g = c.getContext('2d', { willReadFrequently: true });
    const cb = (now, meta) => {
      g.drawImage(video, 0, 0, 64, 64);
      fn(g.getImageData(0, 0, 64, 64).data, meta);
      video.requestVideoFrameCallback(cb);
    };
    video.requestVideoFrameCallback(cb);
  };
})();
"""


def heard_at(ctx_seconds: np.ndarray, clock_map, to_perf: float) -> np.ndarray:
    """AudioContext seconds -> seconds on the page's performance clock when that sound leaves the output.

    Through the (context, performance) samples taken every 200 ms around each point: under load the audio
    device's clock runs at its own rate (0.7 % off over 5 minutes here) and jumps when its thread is late, so
    one mapping taken at the end is off by up to hundreds of ms for sound a minute old."""
    clock_map = np.asarray(clock_map, float).reshape(-1, 2)
    if len(clock_map) < 2:
        return (ctx_seconds * 1000 + to_perf) / 1000.0
    slope, icpt = np.polyfit(clock_map[:, 0], clock_map[:, 1], 1)
    order = np.argsort(clock_map[:, 0])
    mc, mp = clock_map[order, 0], clock_map[order, 1]
    return (np.interp(ctx_seconds, mc, mp - (mc * slope + icpt)) + ctx_seconds * slope + icpt) / 1000.0
