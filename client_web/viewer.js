// The OBS viewer: /viewer?session=ID (or session=latest) shows one session's avatar full-window, with sound.
"use strict";

(() => {
  const video = document.getElementById("avatar");
  const noticeEl = document.getElementById("notice");
  const unmute = document.getElementById("unmute");
  const wanted = new URLSearchParams(location.search).get("session") || "latest";
  let pc = null, conn = null, retry = null, lipSync = null;
  window.emo = { frames: 0, session: null };

  function notice(text) { noticeEl.textContent = text || ""; noticeEl.hidden = !text; }

  function schedule() {
    if (retry) return;
    retry = setTimeout(() => { retry = null; watch(); }, 2000);
  }

  function teardown() {
    if (lipSync) { lipSync.stop(); lipSync = null; }
    if (pc) { pc.close(); pc = null; }
    video.srcObject = null;
  }

  async function watch() {
    teardown();
    try {
      if (!conn) {
        conn = new EmoSignal.Connection((msg) => {
          if (msg.type === "session_ended" || msg.type === "disconnected") {
            if (msg.type === "disconnected") conn = null;
            notice(wanted === "latest" ? "waiting for a session\u2026" : "the session has ended");
            teardown();
            schedule();
          }
        });
        await conn.open();
      }
      pc = new RTCPeerConnection();
      window.emo.pc = pc;
      pc.addTransceiver("video", { direction: "recvonly" });
      pc.addTransceiver("audio", { direction: "recvonly" });
      const remote = new MediaStream();
      video.srcObject = remote;
      pc.ontrack = (e) => {
        remote.addTrack(e.track);
        video.play().catch((err) => {
          if (err.name !== "NotAllowedError") return;
          // browsers (not OBS) refuse autoplay with sound until a click: play muted meanwhile
          video.muted = true;
          unmute.hidden = false;
          video.play().catch(() => {});
        });
      };
      pc.onconnectionstatechange = () => {
        if (pc && pc.connectionState === "failed") { teardown(); schedule(); }
      };
      await pc.setLocalDescription(await pc.createOffer());
      await EmoSignal.gatheringComplete(pc);
      const reply = await conn.request({ type: "view", session: wanted, webrtc: { type: "offer", sdp: pc.localDescription.sdp } },
        "view_started");
      window.emo.session = reply.session;
      await pc.setRemoteDescription(reply.answer);
      lipSync = EmoSignal.assistLipSync(pc, { video });
      window.emo.lipSync = lipSync.state;
      notice("");
    } catch (err) {
      notice(err.code === "not_found" ? (wanted === "latest" ? "waiting for a session\u2026" : "no such session") : (err.message || String(err)));
      teardown();
      schedule();
    }
  }

  unmute.addEventListener("click", () => { video.muted = false; unmute.hidden = true; video.play().catch(() => {}); });
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const count = () => { window.emo.frames += 1; video.requestVideoFrameCallback(count); };
    video.requestVideoFrameCallback(count);
  }
  watch();
})();
