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

  return { token, apiUrl, wsUrl, Connection, gatheringComplete, countFrames };
})();
