"""How the pages start a stream, in real Chromium: what runs while the mic opens, when an offer goes out.

The talk page opens the WebSocket, makes its offer and gets the server's answer while the browser opens the
microphone (the permission prompt and the device's start took 100-600 ms of the first frame); the mic's
track joins the offered audio sender when it comes. Offers go out once Chromium's UDP host candidates are in
(its TCP phase, which the server does not use, ended gathering 100-250 ms later). No timing asserts: the
order of events is what is checked.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.browser import chromium_with_fake_mic, preview_server
from tests.conftest import espeak_wav

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server_url():
    with preview_server(timeout=60) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    wav = espeak_wav(tmp_path_factory.mktemp("mic") / "mic.wav", "Hello there, avatar.", rate=48000)
    with chromium_with_fake_mic(wav) as b:
        yield b


def _sessions(base: str) -> int:
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
        return json.loads(r.read())["sessions"]


# getUserMedia held until the test lets it go: a user still looking at the permission prompt
HELD_MIC = r"""(() => {
  const md = navigator.mediaDevices, gum = md.getUserMedia.bind(md);
  window.__micAsked = 0;
  let release;
  const gate = new Promise((ok) => { release = ok; });
  window.__releaseMic = () => release();
  md.getUserMedia = async (c) => { window.__micAsked += 1; await gate; return gum(c); };
})();"""


def _wait(predicate, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_session_starts_while_the_mic_opens(browser, server_url):
    context = browser.new_context(permissions=["microphone"])
    context.add_init_script(HELD_MIC)
    page = context.new_page()
    try:
        page.goto(server_url + "/")
        page.click("button#start")
        # the server's session exists and the answer is applied, with the mic still not granted
        page.wait_for_function("() => window.emo.session && window.emo.pc && window.emo.pc.remoteDescription",
                               timeout=20000)
        assert page.evaluate("window.__micAsked") == 1
        assert _sessions(server_url) == 1
        assert page.evaluate("window.emo.pc.getSenders().filter((s) => s.track).length") == 0
        assert page.locator("button#stop").is_enabled()   # and the user can stop meanwhile
        page.evaluate("window.__releaseMic()")
        # the mic's track goes onto the offered sender: no renegotiation, the avatar hears it
        page.wait_for_function("() => window.emo.pc.getSenders().some((s) => s.track && s.track.kind === 'audio')",
                               timeout=10000)
        page.wait_for_function("() => window.emo.frames > 10", timeout=20000)
        page.wait_for_function("""async () => { let n = 0; (await window.emo.pc.getStats()).forEach((r) => {
            if (r.type === 'outbound-rtp' && r.kind === 'audio') n = r.packetsSent; }); return n > 20; }""",
                               timeout=10000)
        page.click("button#stop")
        _wait(lambda: _sessions(server_url) == 0, 5, "the session to end")
    finally:
        context.close()


def test_stop_while_the_mic_opens_leaves_no_mic_and_no_error(browser, server_url):
    context = browser.new_context(permissions=["microphone"])
    context.add_init_script(HELD_MIC)
    page = context.new_page()
    try:
        page.goto(server_url + "/")
        page.evaluate("""() => { const gum = navigator.mediaDevices.getUserMedia;
            navigator.mediaDevices.getUserMedia = async (c) => { const s = await gum(c); window.__lateMic = s; return s; }; }""")
        page.click("button#start")
        page.wait_for_function("() => window.emo.session && !document.getElementById('stop').disabled", timeout=20000)
        page.click("button#stop")
        _wait(lambda: _sessions(server_url) == 0, 5, "the session to end")
        page.evaluate("window.__releaseMic()")
        page.wait_for_function("() => window.__lateMic", timeout=10000)
        # the mic that arrived after Stop was closed again, and nothing was reported as an error
        page.wait_for_function("() => window.__lateMic.getTracks().every((t) => t.readyState === 'ended')",
                               timeout=5000)
        assert page.evaluate("window.emo.state") == "idle"
        assert page.locator("#error").is_hidden()
    finally:
        context.close()


# A stand-in peer connection for EmoSignal.gatheringComplete: candidates and states as Chromium fires them.
GATHERING = r"""async (kinds) => {
  const pc = new EventTarget();
  pc.iceGatheringState = 'gathering';
  pc.localDescription = null;
  let resolved = false;
  const waiting = EmoSignal.gatheringComplete(pc, 60000, 40).then(() => { resolved = true; });
  const candidate = (proto) => Object.assign(new Event('icecandidate'),
    { candidate: { candidate: `candidate:1 1 ${proto} 2122194687 192.0.2.2 40000 typ host generation 0` } });
  for (const k of kinds) pc.dispatchEvent(candidate(k));
  await new Promise((ok) => setTimeout(ok, 400));
  const early = resolved;
  pc.iceGatheringState = 'complete';
  pc.dispatchEvent(new Event('icegatheringstatechange'));
  await waiting;
  return early;
}"""


def test_the_offer_waits_for_udp_candidates_not_for_the_tcp_phase(browser, server_url):
    page = browser.new_page()
    try:
        page.goto(server_url + "/viewer?session=none")
        page.wait_for_function("() => typeof EmoSignal !== 'undefined'", timeout=10000)
        # UDP host candidates in, nothing more for a while: the offer goes (long before the 60 s limit)
        assert page.evaluate(GATHERING, ["udp", "udp"]) is True
        # only TCP candidates (which the server cannot use): wait for gathering to complete
        assert page.evaluate(GATHERING, ["tcp"]) is False
        # nothing yet: wait
        assert page.evaluate(GATHERING, []) is False
    finally:
        page.close()


def test_a_busy_server_is_said_without_a_mic_prompt_and_leaves_no_connection(browser, server_url):
    """The capacity check runs beside the offer: a busy answer still comes before the mic's prompt."""
    context = browser.new_context(permissions=["microphone"])
    context.add_init_script(HELD_MIC)
    context.add_init_script("""(() => { const PC = window.RTCPeerConnection; window.__pcs = [];
      window.RTCPeerConnection = class extends PC { constructor(...a) { super(...a); window.__pcs.push(this); } }; })();""")
    page = context.new_page()
    try:
        page.route("**/api/capacity*", lambda route: route.fulfill(status=503, body='{"error": "busy"}',
                                                                  content_type="application/json"))
        page.goto(server_url + "/")
        page.click("button#start")
        page.wait_for_function("() => window.emo.state === 'error'", timeout=20000)
        assert "busy" in page.locator("#error").inner_text()
        assert page.evaluate("window.__micAsked") == 0
        assert page.evaluate("window.__pcs.length") == 1
        page.wait_for_function("() => window.__pcs[0].signalingState === 'closed'", timeout=5000)
        assert _sessions(server_url) == 0
        assert page.locator("button#start").is_enabled()
    finally:
        context.close()
