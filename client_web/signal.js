// Shared by the talk page and the viewer: the /api/ws connection and WebRTC helpers (standard APIs only).
"use strict";

const EmoSignal = (() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");

  function apiUrl(path) {
    const u = new URL(path, location.href);
    if (token) u.searchParams.set("token", token);
    return u.toString();
  }

  function wsUrl() {
    const u = new URL(apiUrl("/api/ws"));
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    return u.toString();
  }

  // One WebSocket; events go to onEvent, replies are awaited with request(type, message, replyType).
  class Connection {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.waiters = [];
      this.ws = null;
    }
    open() {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve();
      return new Promise((resolve, reject) => {
        const ws = new WebSocket(wsUrl());
        ws.binaryType = "arraybuffer";
        ws.onopen = () => { this.ws = ws; resolve(); };
        ws.onerror = () => reject(new Error("cannot reach the server"));
        ws.onclose = (e) => {
          if (this.ws === ws) this.ws = null;
          this.fail(new Error(e.reason || "connection to the server closed"));
          this.onEvent({ type: "disconnected", code: e.code, reason: e.reason });
        };
        ws.onmessage = (e) => {
          if (typeof e.data !== "string") return;
          let msg;
          try { msg = JSON.parse(e.data); } catch (_) { return; }
          const i = this.waiters.findIndex((w) => w.type === msg.type || (msg.type === "error" && msg.request === w.request));
          if (i >= 0) {
            const [w] = this.waiters.splice(i, 1);
            if (msg.type === "error") w.reject(Object.assign(new Error(msg.message), { code: msg.code }));
            else w.resolve(msg);
            return;
          }
          this.onEvent(msg);
        };
      });
    }
    fail(err) {
      for (const w of this.waiters.splice(0)) w.reject(err);
    }
    send(msg) {
      if (!this.ws) throw new Error("not connected");
      this.ws.send(typeof msg === "string" || msg instanceof ArrayBuffer ? msg : JSON.stringify(msg));
    }
    request(msg, replyType, timeoutMs = 15000) {
      return new Promise((resolve, reject) => {
        const w = { type: replyType, request: msg.type, resolve, reject };
        this.waiters.push(w);
        setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) { this.waiters.splice(i, 1); reject(new Error(`no ${replyType} reply from the server`)); }
        }, timeoutMs);
        this.send(msg);
      });
    }
    close() {
      if (this.ws) { const ws = this.ws; this.ws = null; ws.close(1000, "bye"); }
    }
  }

  // aiortc does not trickle ICE: the offer goes out with the candidates gathered so far. Chromium has its
  // UDP host candidates within a few ms but completes gathering only after its TCP phase, 100-250 ms later,
  // and the server uses UDP only. So: complete, or `quietMs` without a new UDP candidate after the first one
  // (more interfaces' UDP candidates come together), or timeoutMs at most.
  function gatheringComplete(pc, timeoutMs = 2000, quietMs = 40) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      let quiet = null;
      const limit = setTimeout(() => done(), timeoutMs);
      const done = () => {
        clearTimeout(quiet);
        clearTimeout(limit);
        pc.removeEventListener("icegatheringstatechange", check);
        pc.removeEventListener("icecandidate", candidate);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const candidate = (e) => {
        if (!e.candidate) { done(); return; }
        if (!/ udp /i.test(e.candidate.candidate)) return;
        clearTimeout(quiet);
        quiet = setTimeout(done, quietMs);
      };
      pc.addEventListener("icegatheringstatechange", check);
      pc.addEventListener("icecandidate", candidate);
      // candidates found before this call are in the description already
      if (pc.localDescription && / udp /i.test(pc.localDescription.sdp)) quiet = setTimeout(done, quietMs);
    });
  }

  // Frames actually painted, via requestVideoFrameCallback where available.
  function countFrames(video, onFps) {
    if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
    let n = 0, since = performance.now();
    const tick = () => {
      n += 1;
      const now = performance.now();
      if (now - since >= 1000) { onFps((n * 1000) / (now - since)); n = 0; since = now; }
      video.requestVideoFrameCallback(tick);
    };
    video.requestVideoFrameCallback(tick);
  }

  // Lip sync without waiting for the browser's own synchronizer. Chromium's (WebRTC's
  // stream_synchronization) needs two sender reports per track, then moves a stream's delay at most 80 ms a
  // second and ignores differences under 30 ms; when a busy machine swells the audio jitter buffer by
  // hundreds of milliseconds (a window opening on 2 cores does), the picture runs ahead of its sound for
  // 10-20 s. getStats gives both tracks' estimated playout positions on the sender's clock
  // (estimatedPlayoutTimestamp: the same figures that synchronizer uses), so the gap is known every
  // `periodMs`. A picture ahead of its sound gets more minimum delay on the video receiver
  // (jitterBufferTarget); a picture behind it first gives that back, then delays the sound (the audio
  // receiver's jitterBufferTarget). Each tick moves by the gap but at most `stepMs`, about what the
  // receivers themselves can follow (Chromium slews a video delay by up to 100 ms a second), so the targets
  // never run ahead of the delays they set. Both are minimums: the browser's synchronizer can still only add.
  // What matters is when each is seen and heard, so the aim is not a zero gap: the sound reaches the device
  // after its playout point by the audio output delay (media-playout stats), the picture reaches the screen
  // after its own by the compositor's delay (requestVideoFrameCallback on `video`: expected display time
  // minus the time the frame was handed over); the gap aimed at is the first minus the second.
  // `?lipsync=0` on the page turns it off. Returns {state, stop()}.
  const lipSyncOn = params.get("lipsync") !== "0";
  function assistLipSync(pc, { video = null, periodMs = 250, stepMs = 20, deadMs = 6, maxMs = 1500 } = {}) {
    const state = { on: lipSyncOn, gap_ms: null, aim_ms: 0, video_target_ms: 0, audio_target_ms: 0, steps: 0 };
    if (!lipSyncOn || !("jitterBufferTarget" in RTCRtpReceiver.prototype)) return { state, stop() {} };
    const last = {};   // kind -> the previous cumulative jitter-buffer figures
    let busy = false, running = true, shown = 0, frames = 0;
    let v = 0, a = 0;   // the video and audio minimum delays asked for (0: none of ours)
    if (video && "requestVideoFrameCallback" in HTMLVideoElement.prototype) {
      const onFrame = (_, meta) => {
        if (!running) return;
        const d = meta.expectedDisplayTime - meta.presentationTime;
        if (d >= 0 && d < 200) { frames += 1; shown += (d - shown) / Math.min(frames, 50); }   // ~2 s average
        video.requestVideoFrameCallback(onFrame);
      };
      video.requestVideoFrameCallback(onFrame);
    }
    // the receiver's own delay over the last tick: where a new minimum starts to matter
    const recent = (r, key) => {
      const prev = last[r.kind + key];
      last[r.kind + key] = [r[key], r.jitterBufferEmittedCount];
      if (!prev || r[key] == null || r.jitterBufferEmittedCount <= prev[1]) return 0;
      return (1000 * (r[key] - prev[0])) / (r.jitterBufferEmittedCount - prev[1]);
    };
    const tick = async () => {
      if (busy || pc.connectionState !== "connected") return;
      const receivers = {};
      for (const r of pc.getReceivers()) if (r.track) receivers[r.track.kind] = r;
      if (!receivers.audio || !receivers.video) return;
      busy = true;
      try {
        const got = {};
        let heard = 0;
        (await pc.getStats()).forEach((r) => {
          if (r.type === "inbound-rtp") got[r.kind] = r;
          else if (r.type === "media-playout" && r.totalSamplesCount) {
            heard = (1000 * r.totalPlayoutDelay) / r.totalSamplesCount;
          }
        });
        if (!got.audio || !got.video) return;
        const videoNow = recent(got.video, "jitterBufferTargetDelay");
        const audioNow = recent(got.audio, "jitterBufferDelay");
        if (!got.audio.estimatedPlayoutTimestamp || !got.video.estimatedPlayoutTimestamp) return;
        // > 0: the sound plays later content than the picture shows, i.e. the picture is late
        const gap = got.audio.estimatedPlayoutTimestamp - got.video.estimatedPlayoutTimestamp;
        state.gap_ms = Math.round(gap);
        state.aim_ms = Math.round(heard - shown);
        const off = gap - (heard - shown);   // > 0: the picture will be seen late
        if (Math.abs(off) < deadMs) return;
        const step = Math.min(stepMs, Math.abs(off));
        if (off < 0) {   // picture early
          if (a > 0) a = Math.max(0, a - step);
          else v = Math.min(maxMs, Math.max(v, videoNow) + step);
        } else if (v > 0) {
          v = Math.max(0, v - step);
        } else {          // picture late with no video delay of ours left: hold the sound back
          a = Math.min(maxMs, Math.max(a, audioNow) + step);
        }
        if ((receivers.video.jitterBufferTarget || 0) !== v) receivers.video.jitterBufferTarget = v;
        if ((receivers.audio.jitterBufferTarget || 0) !== a) receivers.audio.jitterBufferTarget = a;
        Object.assign(state, { video_target_ms: Math.round(v), audio_target_ms: Math.round(a) });
        state.steps += 1;
      } catch (_) {
        /* a closing connection: the next tick (or stop) deals with it */
      } finally {
        busy = false;
      }
    };
    const timer = setInterval(tick, periodMs);
    return { state, stop() { running = false; clearInterval(timer); } };
  }

  return { token, apiUrl, wsUrl, Connection, gatheringComplete, countFrames, assistLipSync };
})();
