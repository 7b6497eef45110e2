// The talk page: mic -> WebRTC -> server; the avatar's video and lip-synced audio come back on video#avatar.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("avatar"), startBtn = $("start"), stopBtn = $("stop"), muteBtn = $("mute");
  const MAX_UPLOAD = 8 * 1024 * 1024;
  const TYPES = ["image/jpeg", "image/png", "image/webp"];

  let conn = null, pc = null, lipSync = null, mic = null, sessionId = null, avatarId = null, avatarReadyText = null;
  let fpsRun = 0;  // each start counts displayed frames anew; an older count must not write any more
  const DEFAULT_POSTER = EmoSignal.apiUrl("/api/avatar.jpg");
  video.poster = DEFAULT_POSTER;  // the avatar that will talk, shown before Start (and after Stop)
  window.emo = { frames: 0, stats: null, state: "idle" };  // read by tests and curious users

  function setState(text, cls) {
    $("state").textContent = text;
    $("state").className = `state ${cls || text}`;
    window.emo.state = text;
  }
  function showError(text) {
    $("error").textContent = text || "";
    $("error").hidden = !text;
  }
  function notice(text) {
    $("notice").textContent = text || "";
    $("notice").hidden = !text;
  }

  function onEvent(msg) {
    switch (msg.type) {
      case "stats": {
        if (msg.session !== sessionId) break;  // a last one in flight after stop
        window.emo.stats = msg;
        const lat = msg.latency_ms || {};
        $("latency").textContent = lat.p95 != null ? `${Math.round(lat.p95)} ms` : "-";
        const fps = msg.playout ? msg.playout.playout_fps : msg.fps;
        $("fps").textContent = fps != null ? Number(fps).toFixed(1) : "-";
        $("av-offset").textContent = msg.playout ? `${msg.playout.av_offset_ms} ms` : "-";
        break;
      }
      case "error":
        showError(msg.message);
        if (msg.fatal) stop("error");
        break;
      case "session_ended":
        if (msg.session === sessionId) { notice(`session ended: ${msg.reason}`); stop("ended"); }
        break;
      case "disconnected":
        if (pc) { showError("lost the connection to the server"); stop("error"); }
        conn = null;
        break;
      default:
        break;
    }
  }

  async function connection() {
    if (!conn) conn = new EmoSignal.Connection(onEvent);
    await conn.open();
    return conn;
  }

  async function start() {
    showError("");
    notice("");
    startBtn.disabled = true;
    setState("starting");
    let myPc = null;
    try {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this page needs microphone access: open it over https:// or on localhost");
      }
      // Everything that does not need the mic runs while the browser opens it (the permission prompt and
      // the device's start take 100-600 ms): the WebSocket, the offer, its ICE gathering and the server's
      // answer. The offer's audio section sends from the start; the mic's track goes onto that sender
      // when it arrives (replaceTrack: no renegotiation), so nothing waits for the mic but its own sound.
      // The capacity check runs beside the offer too (only the mic's prompt waits for it: no prompt when
      // the server is busy); the peer connection is closed again by stop() if it says busy.
      const opened = connection();
      opened.catch(() => {});  // awaited below; an early failure must not go unhandled meanwhile
      const capAsked = fetch(EmoSignal.apiUrl("/api/capacity"));
      capAsked.catch(() => {});
      pc = myPc = new RTCPeerConnection();
      window.emo.pc = pc;
      const remote = new MediaStream();
      video.srcObject = remote;
      pc.ontrack = (e) => {
        remote.addTrack(e.track);
        video.play().catch(() => {});  // the click on start allows playback with sound
      };
      pc.onconnectionstatechange = () => {
        if (!pc) return;
        $("conn").textContent = pc.connectionState;
        if (pc.connectionState === "connected") setState("live");
        if (pc.connectionState === "failed") { showError("the media connection failed"); stop("error"); }
      };
      const micSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
      pc.addTransceiver("video", { direction: "recvonly" });
      const described = pc.createOffer().then((offer) => myPc.setLocalDescription(offer));
      described.catch(() => {});
      const cap = await capAsked;
      if (cap.status === 503) throw new Error("the server is busy (all session slots are in use); try again later");
      const micAsked = navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
        video: false,
      });
      micAsked.catch(() => {});
      await described;
      await EmoSignal.gatheringComplete(pc);
      const c = await opened;
      const reply = await c.request({
        type: "start",
        avatar: avatarId || undefined,
        webrtc: { type: "offer", sdp: pc.localDescription.sdp },
        stats_interval: 1,
      }, "session_started");
      sessionId = reply.session;
      window.emo.session = sessionId;
      if (avatarReadyText) $("avatar-status").textContent = "ready: in use";
      $("session").textContent = sessionId;
      $("viewer-link").href = reply.viewer_url;
      await pc.setRemoteDescription(reply.answer);
      lipSync = EmoSignal.assistLipSync(pc, { video });
      window.emo.lipSync = lipSync.state;
      stopBtn.disabled = false;
      const run = ++fpsRun;
      EmoSignal.countFrames(video, (fps) => { if (run === fpsRun) $("display-fps").textContent = fps.toFixed(1); });
      const stream = await micAsked;
      if (pc !== myPc) { stream.getTracks().forEach((t) => t.stop()); return; }  // stopped meanwhile
      mic = stream;
      await micSender.replaceTrack(mic.getAudioTracks()[0] || null);
    } catch (err) {
      if (myPc && pc !== myPc) return;  // Stop was pressed meanwhile (say, during the mic's prompt)
      showError(err.message || String(err));
      await stop("error");
    }
  }

  async function stop(reason) {
    const wasLive = !!pc;
    if (conn && sessionId && reason !== "ended") {
      try { conn.send({ type: "stop" }); } catch (_) { /* already gone */ }
    }
    sessionId = null;
    if (lipSync) { lipSync.stop(); lipSync = null; }
    if (pc) { pc.ontrack = null; pc.onconnectionstatechange = null; pc.close(); pc = null; }
    if (mic) { mic.getTracks().forEach((t) => t.stop()); mic = null; }
    video.srcObject = null;
    startBtn.disabled = false;
    stopBtn.disabled = true;
    fpsRun += 1;
    for (const id of ["conn", "session", "latency", "fps", "display-fps", "av-offset"]) $(id).textContent = "-";
    window.emo.stats = null;
    if (reason === "error") setState("error");
    else setState("idle");
    if (!reason && wasLive) notice("Stopped. Press Start talking to go again.");
  }

  muteBtn.addEventListener("click", () => {
    video.muted = !video.muted;
    muteBtn.setAttribute("aria-pressed", String(video.muted));
    muteBtn.textContent = video.muted ? "Unmute avatar" : "Mute avatar";
  });

  $("avatar-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    showError("");
    if (!TYPES.includes(file.type)) { showError("choose a JPEG, PNG or WebP image"); return; }
    if (file.size > MAX_UPLOAD) { showError("that image is larger than 8 MB"); return; }
    $("avatar-status").textContent = "preparing the portrait\u2026";
    try {
      const c = await connection();
      const announce = c.request({ type: "avatar", content_type: file.type, size: file.size }, "avatar_ready", 60000);
      c.send(await file.arrayBuffer());
      const reply = await announce;
      avatarId = reply.avatar;
      const img = $("avatar-preview");
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.src = URL.createObjectURL(file);
      img.hidden = false;
      video.poster = img.src;
      $("avatar-status").textContent = sessionId ? "ready: used from the next start" : "ready: press start";
      avatarReadyText = $("avatar-status").textContent;
    } catch (err) {
      // the previous upload is not what will talk either: back to the built-in portrait, visibly
      avatarId = null;
      avatarReadyText = null;
      const img = $("avatar-preview");
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
      img.removeAttribute("src");
      img.hidden = true;
      video.poster = DEFAULT_POSTER;
      $("avatar-status").textContent = "upload failed: the built-in portrait will talk";
      showError(err.message || String(err));
    }
  });

  startBtn.addEventListener("click", start);
  stopBtn.addEventListener("click", () => stop());
  video.addEventListener("playing", () => { window.emo.playing = true; });
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const count = () => { window.emo.frames += 1; video.requestVideoFrameCallback(count); };
    video.requestVideoFrameCallback(count);
  }
  window.addEventListener("pagehide", () => { if (conn) conn.close(); });
})();
