"""The pages' lip-sync assist (client_web/signal.js `assistLipSync`) in real Chromium, against a stand-in peer
connection whose two receivers behave as Chromium's do: each plays with its own natural delay or the minimum
its jitterBufferTarget sets, whichever is larger, and moves toward it by at most 100 ms a second; getStats
reports their estimated playout positions on the sender's clock.

What a busy machine does to a real page: the audio jitter buffer swells (picture early), drains again
(picture late), the video path gets slow (picture late with no video delay left to give back). The assist
must close each gap and never ask a receiver for more than it can follow. tests/test_browser_e2e.py checks
it runs on the real pages; bench/av_sync.py measures what it does to lips vs sound.
"""

from __future__ import annotations

import wave

import pytest

from tests.browser import chromium_with_fake_mic
from tests.conftest import REPO

pytestmark = pytest.mark.browser

# Runs `phases` (each: the receivers' natural delays, the sound's output delay after its playout point, and how
# many assist ticks to run), one simulated 250 ms
# per getStats call; returns per phase the final gap (> 0: the picture is late), the targets, and the worst
# amount by which a target ran ahead of the delay it asked for.
SIMULATE = r"""async (phases) => {
  const SLEW = 25;                      // ms a receiver's delay moves per simulated 250 ms
  const rx = { audio: { track: { kind: 'audio' }, jitterBufferTarget: null },
               video: { track: { kind: 'video' }, jitterBufferTarget: null } };
  const sim = { t: 1e6, natural: { audio: 0, video: 0 }, delay: { audio: 0, video: 0 }, heard: 0,
                cum: { audio: 0, video: 0 }, n: 0, ticks: 0, ahead: 0 };
  const follow = (kind) => {
    const want = Math.max(sim.natural[kind], rx[kind].jitterBufferTarget || 0);
    const d = sim.delay[kind];
    sim.delay[kind] = d + Math.max(-SLEW, Math.min(SLEW, want - d));
    sim.ahead = Math.max(sim.ahead, (rx[kind].jitterBufferTarget || 0) - Math.max(sim.natural[kind], d));
  };
  let wake = null;
  const pc = {
    connectionState: 'connected',
    getReceivers: () => [rx.audio, rx.video],
    async getStats() {
      sim.t += 250; sim.n += 12; sim.ticks += 1;
      follow('audio'); follow('video');
      sim.cum.audio += 12 * sim.delay.audio / 1000;
      sim.cum.video += 12 * sim.delay.video / 1000;
      if (wake) wake();
      return new Map([
        ['a', { type: 'inbound-rtp', kind: 'audio', estimatedPlayoutTimestamp: sim.t - sim.delay.audio,
                jitterBufferDelay: sim.cum.audio, jitterBufferEmittedCount: sim.n }],
        ['v', { type: 'inbound-rtp', kind: 'video', estimatedPlayoutTimestamp: sim.t - sim.delay.video,
                jitterBufferDelay: 0.004 * sim.n, jitterBufferTargetDelay: sim.cum.video,
                jitterBufferEmittedCount: sim.n }],
        ['o', { type: 'outbound-rtp', kind: 'audio' }],
        ['p', { type: 'media-playout', kind: 'audio', totalSamplesCount: 48 * sim.n,
                totalPlayoutDelay: (48 * sim.n * sim.heard) / 1000 }]]);
    },
  };
  const assist = EmoSignal.assistLipSync(pc, { periodMs: 2 });
  const out = [];
  for (const phase of phases) {
    Object.assign(sim.natural, phase.natural);
    sim.heard = phase.heard || 0;
    sim.ahead = 0;
    const until = sim.ticks + phase.ticks;
    while (sim.ticks < until) await new Promise((ok) => { wake = ok; });
    out.push({ gap: sim.delay.video - sim.delay.audio, video_target: rx.video.jitterBufferTarget,
               audio_target: rx.audio.jitterBufferTarget, ahead: sim.ahead, state: { ...assist.state } });
  }
  assist.stop();
  return out;
}"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    wav = tmp_path_factory.mktemp("mic") / "silence.wav"
    with wave.open(str(wav), "wb") as w:   # the launcher wants a mic file; nothing here records
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(b"\0\0" * 4800)
    with chromium_with_fake_mic(wav) as browser:
        page = browser.new_page()
        page.set_content("<!doctype html><title>assist</title>")
        page.add_script_tag(path=str(REPO / "client_web" / "signal.js"))
        if not page.evaluate("'jitterBufferTarget' in RTCRtpReceiver.prototype"):
            pytest.skip("this Chromium has no jitterBufferTarget")
        yield page


def test_the_assist_closes_the_gap_both_ways_and_never_runs_ahead(page):
    early, drained, slow_video = page.evaluate(SIMULATE, [
        {"natural": {"audio": 300, "video": 20}, "ticks": 40},   # a window opens: the audio buffer swells
        {"natural": {"audio": 40, "video": 20}, "ticks": 40},    # it drains: the video delay given back
        {"natural": {"audio": 40, "video": 110}, "ticks": 40},   # slow video: the sound is held back
    ])
    # the picture ran 280 ms ahead: the video receiver got about that much minimum delay, the sound none
    assert abs(early["gap"]) <= 6, early
    assert 280 <= early["video_target"] <= 310 and not early["audio_target"], early
    # the audio buffer drained: the video's extra delay was given back down to the sound's
    assert abs(drained["gap"]) <= 6, drained
    assert drained["video_target"] <= 50 and not drained["audio_target"], drained
    # video 70 ms behind with nothing of ours left to give back: the sound waits for it
    assert abs(slow_video["gap"]) <= 6, slow_video
    assert not slow_video["video_target"] and 100 <= slow_video["audio_target"] <= 130, slow_video
    # a target never asked a receiver for more than one step beyond where it was
    for phase in (early, drained, slow_video):
        assert phase["ahead"] <= 20 + 1e-6, phase
        assert phase["state"]["on"] and phase["state"]["steps"] > 0


def test_small_gaps_are_left_alone(page):
    # 4 ms is under the dead band (and under a video frame): no target is set
    (still,) = page.evaluate(SIMULATE, [{"natural": {"audio": 44, "video": 40}, "ticks": 20}])
    assert still["video_target"] is None and still["audio_target"] is None, still
    assert still["state"]["steps"] == 0 and still["state"]["gap_ms"] == -4


def test_the_sound_output_delay_is_aimed_for(page):
    # the sound is heard 30 ms after it is played out: the picture is shown that much after the sound's
    # playout point too, so both reach the viewer together
    (done,) = page.evaluate(SIMULATE, [{"natural": {"audio": 200, "video": 20}, "heard": 30, "ticks": 40}])
    assert abs(done["gap"] - 30) <= 6, done
    assert done["state"]["aim_ms"] == 30 and 220 <= done["video_target"] <= 240, done
