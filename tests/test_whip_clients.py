"""WHIP and WHEP with clients we did not write: Chromium's own WebRTC (RTCPeerConnection + fetch, a page of a
few lines served from another origin, so CORS and the bearer token are exercised too) and Debian's
simple-whip-client (GStreamer webrtcbin). `emo-stream serve` runs as a subprocess with a token."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser import chromium_with_fake_mic, preview_server
from tests.conftest import espeak_wav

pytestmark = pytest.mark.browser

TOKEN = "whip-test-token-0123456789abcdef"   # at least 128 bits (issue 23)
SPEECH = "Hello, I am talking to my avatar through WHIP. It should move its lips while I speak, and keep going."

# The whole client side of WHIP and WHEP, as a player or a publisher page would write it.
PAGE = """<!doctype html><meta charset="utf-8"><video id="v" autoplay playsinline></video><script>
async function exchange(url, token, pc) {
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => {            // no trickle: every candidate goes in the offer
    if (pc.iceGatheringState === 'complete') return ok();
    pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && ok());
  });
  const r = await fetch(url, {method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + token}});
  if (r.status !== 201) throw new Error(r.status + ' ' + await r.text());
  await pc.setRemoteDescription({type: 'answer', sdp: await r.text()});
  return {location: r.headers.get('Location'), session: r.headers.get('Emo-Session')};
}
window.publish = async (base, token) => {          // WHIP: the fake mic's speech in, the avatar back
  const pc = window.pub = new RTCPeerConnection();
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTrack(mic.getAudioTracks()[0]);
  pc.addTransceiver('video', {direction: 'recvonly'});
  return exchange(base + '/whip', token, pc);
};
window.play = async (base, token, session) => {    // WHEP: watch a session
  const pc = window.player = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const stream = new MediaStream();
  pc.ontrack = (e) => { stream.addTrack(e.track); document.getElementById('v').srcObject = stream; };
  return exchange(base + '/whep?session=' + session, token, pc);
};
window.inbound = async (pc) => {
  const out = {};
  (await pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') out[s.kind] = s; });
  return out;
};
window.remove = async (url, token) =>
  (await fetch(url, {method: 'DELETE', headers: {'Authorization': 'Bearer ' + token}})).status;
</script>"""


def _get(base: str, path: str) -> dict:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _sessions(base: str) -> list[dict]:
    return _get(base, "/api/sessions")["sessions"]


def _stat(page, pc: str, kind: str, name: str) -> float:
    """One inbound-rtp figure of the page's peer connection `pc` (0 while there is none yet)."""
    return page.evaluate(f"async () => ((await inbound({pc})).{kind} || {{}}).{name} || 0")


def _wait(what, cond, timeout: float):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture(scope="module")
def server_url():
    with preview_server(env={"EMO_STREAM_TOKEN": TOKEN}) as url:   # the token not in argv (ps)
        yield url


@pytest.fixture(scope="module")
def page_url():
    """The client page, served from another origin (another port on loopback): cross-origin, as a player would be."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/client.html"
    httpd.shutdown()


@pytest.fixture(scope="module")
def speech_48k(tmp_path_factory) -> Path:
    return espeak_wav(tmp_path_factory.mktemp("whip") / "speech.wav", SPEECH, rate=48000)


@pytest.fixture(scope="module")
def browser(speech_48k):
    with chromium_with_fake_mic(speech_48k) as b:
        yield b


def test_chromium_publishes_with_whip_and_plays_with_whep(browser, server_url, page_url):
    context = browser.new_context(permissions=["microphone"])
    publisher, player = context.new_page(), context.new_page()
    try:
        publisher.goto(page_url)
        made = publisher.evaluate("([b, t]) => publish(b, t)", [server_url, TOKEN])
        assert made["location"].startswith(server_url + "/whip/")
        session = made["session"]
        # the browser's (fake) mic drives the avatar
        _wait("speech frames from Chromium's WHIP audio", lambda: any(
            s["session"] == session and s["playout"]["speech_frames"] > 10 for s in _sessions(server_url)), 40)
        _wait("Chromium to decode the avatar's video on its WHIP connection",
              lambda: _stat(publisher, "pub", "video", "framesDecoded") > 25, 20)

        # a second origin's player watches it with WHEP ("latest" is this session)
        player.goto(page_url)
        watch = player.evaluate("([b, t]) => play(b, t, 'latest')", [server_url, TOKEN])
        assert watch["session"] == session and watch["location"].startswith(server_url + "/whep/")
        _wait("WHEP video in Chromium", lambda: _stat(player, "player", "video", "framesDecoded") > 25, 20)
        _wait("WHEP audio in Chromium", lambda: _stat(player, "player", "audio", "totalAudioEnergy") > 0, 20)
        assert _stat(player, "player", "video", "frameWidth") == 128
        assert [s["viewers"] for s in _sessions(server_url) if s["session"] == session] == [1]

        # DELETE ends the player, then the session; twice is 404
        assert player.evaluate("([u, t]) => remove(u, t)", [watch["location"], TOKEN]) == 200
        assert player.evaluate("([u, t]) => remove(u, t)", [watch["location"], TOKEN]) == 404
        assert publisher.evaluate("([u, t]) => remove(u, t)", [made["location"], TOKEN]) == 200
        _wait("the session to end", lambda: not _sessions(server_url), 10)
    finally:
        context.close()


SOUP_CLASH = "libsoup2 symbols detected"


def test_simple_whip_client_publishes_speech(server_url, speech_48k):
    """Debian's simple-whip-client (GStreamer webrtcbin) sends espeak-ng speech into /whip."""
    client = shutil.which("whip-client")
    if client is None:
        pytest.skip("simple-whip-client is not installed (apt-get install simple-whip-client)")
    audio = (f"filesrc location={speech_48k} ! wavparse ! identity sync=true ! audioconvert ! audioresample ! "
             "queue ! opusenc ! rtpopuspay pt=100 ssrc=1 ! queue ! "
             "application/x-rtp,media=audio,encoding-name=OPUS,payload=100")
    proc = subprocess.Popen([client, "-u", server_url + "/whip", "-t", TOKEN, "-n", "-o", "-l", "4", "-A", audio],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    try:
        def published():
            if proc.poll() is not None:
                return "exited"
            return [s for s in _sessions(server_url) if s["kind"] == "whip" and s["playout"]["speech_frames"] > 10]

        result = _wait("speech frames from simple-whip-client", published, 40)
        if result == "exited":
            time.sleep(0.2)
            log = "".join(out)
            if SOUP_CLASH in log:
                # Debian bookworm: whip-client links libsoup2 while libnice (via gupnp-igd) loads libsoup3, and
                # libsoup aborts the process before it sends anything: the packaged client cannot run here
                pytest.skip(f"Debian's simple-whip-client aborts at start ({SOUP_CLASH}: libsoup2 and libsoup3 "
                            "in one process)")
            raise AssertionError(f"whip-client exited {proc.returncode}:\n{log[-3000:]}")
        assert result[0]["audio_in_s"] > 1.0
    finally:
        if proc.poll() is None:
            proc.send_signal(2)   # SIGINT: it DELETEs its session on the way out
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    _wait("the session to end after the client left", lambda: not _sessions(server_url), 45)
