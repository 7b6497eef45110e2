"""A/V sync buffer (server/sync.py) with a simulated clock: pacing, pairing, no drift over an hour, stalls, clear."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np
import pytest

from server.sync import AUDIO_CHUNK, AUDIO_RATE, DropQueue, Playout, QueueClosed, Upsampler

FPS = 25
SPF = 16000 // FPS


class SimClock:
    """Simulated time: sleeping jumps the clock, optionally oversleeping by a random jitter (a busy loop)."""

    def __init__(self, jitter: float = 0.0, seed: int = 0):
        self.t = 1000.0
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.wakeups: list[tuple[float, float]] = []  # (asked, got)

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        if t > self.t:  # no real waiting: the playout is the only task that runs in these tests
            self.t = t + (self.rng.uniform(0, self.jitter) if self.jitter else 0.0)


@dataclass
class Frame:
    index: int
    image: np.ndarray
    audio: np.ndarray
    speech: bool = True
    segment_end: bool = False


def frames(n: int, start: int = 0, speech=True, end_at: int | None = None, clock=None, stall: dict | None = None,
           image=None):
    image = np.zeros((4, 4, 3), np.uint8) if image is None else image

    async def gen():
        for k in range(start, start + n):
            if stall and k in stall:
                clock.t += stall[k]  # the engine took this long to deliver frame k
            # each frame's audio encodes its index, so pairing can be checked after resampling
            audio = np.full(SPF, ((k % 50) + 1) / 100.0, np.float32)
            yield Frame(k, image, audio, speech=speech, segment_end=(end_at == k))

    return gen()


def test_upsampler_is_seamless_and_exact_length():
    t = np.arange(16000) / 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    whole = Upsampler()(x)
    up = Upsampler()
    pieces = np.concatenate([up(x[i:i + SPF]) for i in range(0, len(x), SPF)])
    assert len(pieces) == 3 * len(x)
    np.testing.assert_array_equal(whole, pieces)  # chunking changes nothing
    # a 440 Hz tone stays a 440 Hz tone at 48 kHz
    spectrum = np.abs(np.fft.rfft(pieces.astype(np.float64)))
    assert abs(np.argmax(spectrum) * AUDIO_RATE / len(pieces) - 440) < 2


async def test_pairs_each_frame_with_its_audio_and_paces_on_one_clock():
    clock = SimClock()
    play = Playout(frames(50), FPS, clock)
    sub = play.subscribe("t", frames=100, audio=200)
    await play.run()
    got = []
    while len(sub.frames):
        got.append(await sub.frames.get())
    chunks = []
    while len(sub.audio):
        chunks.append(await sub.audio.get())
    assert [f.seq for f in got] == list(range(50))
    assert [f.video_pts for f in got] == [k * 3600 for k in range(50)]
    assert [c.pts for c in chunks] == [n * AUDIO_CHUNK for n in range(len(chunks))]
    # all audio but the last partial chunk comes out, 3x the samples
    assert len(chunks) == 50 * SPF * 3 // AUDIO_CHUNK
    # frame k's own audio (level (k+1)/100) sits in chunks 2k, 2k+1 (allowing the short filter delay)
    for k in range(1, 49):
        middle = np.concatenate([chunks[2 * k].samples, chunks[2 * k + 1].samples])[100:-100]
        assert abs(middle.mean() / 32767 - (k + 1) / 100) < 2e-3
    assert play.max_av_offset_s < 1 / FPS


async def test_no_drift_over_an_hour_with_a_jittery_clock():
    clock = SimClock(jitter=0.015)  # every wakeup up to 15 ms late
    n = 3600 * FPS
    releases = []

    play = Playout(frames(n), FPS, clock)
    sub = play.subscribe("rec", frames=2, audio=2)
    # record when each frame/chunk came out instead of queueing it
    sub.frames.put = lambda f: releases.append(("v", f.pts, clock.now()))
    sub.audio.put = lambda c: releases.append(("a", c.pts / AUDIO_RATE, clock.now()))
    await play.run()
    video = [(pts, t) for kind, pts, t in releases if kind == "v"]
    audio = [(pts, t) for kind, pts, t in releases if kind == "a"]
    assert len(video) == n
    assert len(audio) == n * 2
    t0 = video[0][1]
    # every frame and chunk goes out within the jitter of its ideal time: no accumulation over the hour
    worst_v = max(t - t0 - pts for pts, t in video)
    worst_a = max(t - t0 - pts for pts, t in audio)
    assert worst_v < 0.016 and worst_a < 0.016
    assert min(t - t0 - pts for pts, t in video) >= 0
    assert video[-1][0] == pytest.approx(3600 - 1 / FPS)
    assert audio[-1][0] == pytest.approx(3600 - AUDIO_CHUNK / AUDIO_RATE)
    assert play.reanchors == 0
    assert play.max_av_offset_s < 1 / FPS


async def test_a_late_engine_stalls_both_tracks_together():
    clock = SimClock()
    play = Playout(frames(100, clock=clock, stall={40: 0.5}), FPS, clock, late_tolerance_s=0.1)
    releases = []
    sub = play.subscribe("rec", frames=2, audio=2)
    sub.frames.put = lambda f: releases.append(("v", f.pts, clock.now()))
    sub.audio.put = lambda c: releases.append(("a", c.pts / AUDIO_RATE, clock.now()))
    await play.run()
    assert play.reanchors == 1
    video = {round(pts, 3): t for kind, pts, t in releases if kind == "v"}
    audio = {round(pts, 3): t for kind, pts, t in releases if kind == "a"}
    for pts in (0.0, 1.0, 1.6, 2.0, 3.96):  # before and after the stall, pts->time is the same for both tracks
        assert audio[pts] == pytest.approx(video[pts])
    # the stall shows up as a shift of the whole timeline, not a gap between the tracks
    # (frame 40 was due at 1.60 s and arrived at 1.58 + 0.5 = 2.08 s: everything after moves 0.48 s)
    assert video[3.96] - video[0.0] == pytest.approx(3.96 + 0.48)
    assert video[1.56] - video[0.0] == pytest.approx(1.56)
    assert play.max_av_offset_s < 1 / FPS


async def test_playback_events_and_interrupt():
    clock = SimClock()
    events = []

    async def source():
        async for f in frames(5, speech=False):
            yield f
        async for f in frames(10, start=5, end_at=14):
            yield f
        async for f in frames(5, start=15, speech=False):
            yield f
        async for f in frames(10, start=20):
            if f.index == 24:
                play.clear()  # the bot interrupts mid-utterance
            yield f

    play = Playout(source(), FPS, clock, on_event=events.append)
    await play.run()
    assert events[0] == {"type": "playback_started", "segment": 1, "pts": 0.2}
    assert events[1] == {"type": "playback_finished", "segment": 1, "position": 0.4, "interrupted": False}
    assert events[2]["type"] == "playback_started" and events[2]["segment"] == 2
    assert events[3] == {"type": "playback_finished", "segment": 2, "position": 0.16, "interrupted": True}
    # speech that continues after the clear was pushed after it: a new utterance
    assert events[4]["type"] == "playback_started" and events[4]["segment"] == 3



async def test_a_clear_while_a_speech_frame_waits_for_its_time_releases_it_silent():
    """The frame already fetched and waiting for its due time when clear arrives is stale speech: it is
    shown but not played, and it does not open a new utterance after the interrupt."""
    events = []

    class ClearingClock(SimClock):
        cleared = False

        async def sleep_until(self, t: float) -> None:
            if not self.cleared and play.t0 is not None and abs(t - play.due(7)) < 1e-9:
                self.cleared = True
                play.clear()  # the bot's clear lands while frame 7 waits for its time
            await super().sleep_until(t)

    class Sink:  # keeps every frame (a DropQueue would be emptied by the clear)
        dropped = 0

        def __init__(self):
            self.put = got.append

        def close(self):
            pass

    got: list = []
    play = Playout(frames(12), FPS, ClearingClock(), on_event=events.append)
    sub = play.subscribe("bot", frames=None, audio=100, frames_sink=Sink())
    await play.run()
    assert [f.speech for f in got] == [True] * 7 + [False] + [True] * 4
    assert not got[7].audio.any() and got[8].audio.all()  # frame 7's audio is not played
    chunks = []  # the clear emptied the queue: what is left starts with frame 7's audio
    while len(sub.audio):
        chunks.append(await sub.audio.get())
    per_frame = len(chunks) // 5
    assert len(chunks) == 5 * per_frame and chunks[0].pts == 7 * per_frame * AUDIO_CHUNK
    assert not np.concatenate([c.samples for c in chunks[:per_frame]]).any()
    assert np.concatenate([c.samples for c in chunks[per_frame:]]).any()
    kinds = [(e["type"], e["segment"]) for e in events]
    # segment 1 is cut at frame 7; frames 8.. were pushed after the clear: segment 2, nothing in between
    assert kinds == [("playback_started", 1), ("playback_finished", 1), ("playback_started", 2)]
    assert events[1]["interrupted"] is True and events[1]["position"] == pytest.approx(7 / FPS)


async def test_slow_subscriber_is_bounded_and_does_not_slow_others():
    clock = SimClock()
    play = Playout(frames(200), FPS, clock)
    slow = play.subscribe("slow", frames=3, audio=10)  # never read
    fast_seen = []
    fast = play.subscribe("fast", frames=3, audio=10)
    fast.frames.put = lambda f: fast_seen.append(f.seq)
    await play.run()
    assert fast_seen == list(range(200))
    assert slow.frames.dropped == 197 and slow.audio.dropped == 400 - 10
    # the run ended: subscriptions are closed and drained readers see the end
    with pytest.raises(QueueClosed):
        for _ in range(4):
            await slow.frames.get()


async def test_drop_queue_keeps_newest():
    q: DropQueue[int] = DropQueue(2)
    for i in range(5):
        q.put(i)
    assert [await q.get(), await q.get()] == [3, 4]
    assert q.dropped == 3
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.close()
    with pytest.raises(QueueClosed):
        await waiter


async def test_webrtc_tracks_carry_one_timeline():
    """The aiortc tracks hand out the playout's frames with 90 kHz / 48 kHz pts that map to the same times."""
    from fractions import Fraction

    from aiortc.mediastreams import MediaStreamError

    from server.rtc import PlayoutAudioTrack, PlayoutVideoTrack

    clock = SimClock()
    image = np.full((16, 16, 3), 200, np.uint8)
    play = Playout(frames(10, image=image), FPS, clock)
    sub = play.subscribe("pc", frames=20, audio=40)
    video, audio = PlayoutVideoTrack(sub), PlayoutAudioTrack(sub)
    await play.run()
    v = [await video.recv() for _ in range(10)]
    a = [await audio.recv() for _ in range(20)]
    assert [f.pts for f in v] == [k * 3600 for k in range(10)]
    assert all(f.time_base == Fraction(1, 90000) and f.format.name == "yuv420p" for f in v)
    assert [f.pts for f in a] == [n * 960 for n in range(20)]
    assert all(f.sample_rate == 48000 and f.samples == 960 and f.layout.name == "mono" for f in a)
    # frame k and audio chunk 2k start at the same instant
    for k in range(10):
        assert v[k].pts / 90000 == a[2 * k].pts / 48000
    with pytest.raises(MediaStreamError):  # the session ended: the tracks end too
        await video.recv()


async def test_webrtc_sender_reports_map_each_packet_to_its_release_time():
    """Chromium aligns audio and video by the RTCP sender reports (NTP <-> RTP time per track). They must say
    when the Playout released a frame or chunk, not when aiortc got it out (a slow VP8 encode, a busy loop or
    a stall on one track would otherwise shift that track on screen); the video bias moves only the video."""
    import inspect

    from aiortc import RTCPeerConnection, RTCRtpSender

    from server.rtc import PlayoutAudioTrack, PlayoutClockSender, PlayoutVideoTrack

    # the hook: aiortc stamps every packet it sends through this private attribute
    assert "self.__ntp_timestamp = clock.current_ntp_time()" in inspect.getsource(RTCRtpSender._run_rtp)
    clock = SimClock()
    play = Playout(frames(6, clock=clock), FPS, clock)
    sub = play.subscribe("pc", frames=20, audio=40)
    video, audio = PlayoutVideoTrack(sub, delay_s=0.02), PlayoutAudioTrack(sub)
    await play.run()
    pc = RTCPeerConnection()
    try:
        senders = {t.kind: PlayoutClockSender.adopt(pc.addTrack(t)) for t in (video, audio)}
        second = 1 << 32
        sent_at = 5_000_000 * second            # NTP time the packet left
        for track, bias in ((video, 0.02), (audio, 0.0)):
            for _ in range(3):
                await track.recv()
            clock.t = track.sent_due + 0.25     # it left 250 ms after its release
            senders[track.kind]._RTCRtpSender__ntp_timestamp = sent_at
            reported = senders[track.kind]._RTCRtpSender__ntp_timestamp
            assert abs(reported - (sent_at - round((0.25 - bias) * second))) <= 1
        # the stamps are the Playout's release times: frame 2 at 80 ms, chunk 2 at 40 ms
        assert video.sent_due - audio.sent_due == pytest.approx(2 / FPS - 2 * 0.02)
    finally:
        await pc.close()


async def test_webrtc_sender_reports_stay_on_the_release_clock_across_a_gap_in_the_audio(monkeypatch):
    """aiortc's real sender and Opus encoder: chunks dropped from the queue (an interrupt, a stalled viewer)
    leave a gap, and the packet after it is stamped by the encoder as if none had gone (its look-ahead starts
    in the chunk before). Every (NTP, RTP) pair a sender report can carry must still map that packet's RTP time
    to its release time: here all chunks lie on one line, NTP - RTP / 48 kHz is the same for every packet."""
    import aiortc.rtcrtpsender
    from aiortc import RTCPeerConnection, RTCRtpCodecParameters

    from server.rtc import PlayoutAudioTrack, PlayoutClockSender

    clock = SimClock()
    play = Playout(frames(20, clock=clock), FPS, clock)
    sub = play.subscribe("pc", frames=None, audio=100)
    audio = PlayoutAudioTrack(sub)
    await play.run()
    second = 1 << 32
    monkeypatch.setattr(aiortc.rtcrtpsender.clock, "current_ntp_time", lambda: 5_000_000 * second)
    pairs = []

    class Transport:   # records what a sender report would say when each packet goes out
        _stats_id = "t"

        async def _send_rtp(self, data: bytes) -> None:
            pairs.append((sender._RTCRtpSender__ntp_timestamp, sender._RTCRtpSender__rtp_timestamp))
            if len(pairs) == 4:
                for _ in range(5):   # 100 ms of audio dropped before the sender took it
                    sub.audio._items.popleft()

    pc = RTCPeerConnection()
    try:
        sender = PlayoutClockSender.adopt(pc.addTrack(audio))
        sender._RTCRtpSender__transport = Transport()
        await sender._run_rtp(RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2,
                                                    payloadType=111))
        pairs.append((sender._RTCRtpSender__ntp_timestamp, sender._RTCRtpSender__rtp_timestamp))
    finally:
        await pc.close()
    pairs = pairs[1:]   # (the first packet has no pair before it)
    assert len(pairs) > 20
    rtp0 = pairs[0][1]
    offsets = [ntp / second - ((rtp - rtp0) % (1 << 32)) / AUDIO_RATE for ntp, rtp in pairs]
    assert max(offsets) - min(offsets) < 1e-4, offsets


async def test_a_sender_without_aiortcs_private_stamps_is_named_in_the_log(caplog):
    """PlayoutClockSender hooks aiortc's private per-packet stamps: an aiortc that renamed them still sends (its
    reports keep send times) and the log says so, instead of lip sync silently going back to send times."""
    from aiortc import RTCPeerConnection

    from server.rtc import PlayoutAudioTrack, PlayoutClockSender

    play = Playout(frames(1), FPS, SimClock())
    pc = RTCPeerConnection()
    try:
        sender = pc.addTrack(PlayoutAudioTrack(play.subscribe("pc", frames=None)))
        del sender.__dict__["_RTCRtpSender__rtp_timestamp"]
        PlayoutClockSender.adopt(sender)
        assert "sender reports keep send times" in caplog.text
    finally:
        await pc.close()


async def test_webrtc_tracks_joining_late_start_at_the_newest_entry():
    """A sender that first asks after ICE and DTLS gets the newest frame and chunk, not the backlog (which,
    sent at once, started the browser's jitter buffers deep: the sound 200 ms behind the picture)."""
    from server.rtc import PlayoutAudioTrack, PlayoutVideoTrack

    clock = SimClock()
    play = Playout(frames(10, clock=clock), FPS, clock)
    sub = play.subscribe("pc", frames=3, audio=10)
    video, audio = PlayoutVideoTrack(sub, join_live=True), PlayoutAudioTrack(sub, join_live=True)
    await play.run()
    assert (await video.recv()).pts == 9 * 3600 and (await audio.recv()).pts == 19 * 960


async def test_latency_added_by_a_stall_is_won_back_on_idle_frames():
    clock = SimClock()
    play = Playout(frames(100, speech=False, clock=clock, stall={20: 0.3}), FPS, clock, late_tolerance_s=0.1)
    releases = []
    sub = play.subscribe("rec", frames=2, audio=2)
    sub.frames.put = lambda f: releases.append(("v", f.pts, clock.now()))
    sub.audio.put = lambda c: releases.append(("a", c.pts / AUDIO_RATE, clock.now()))
    await play.run()
    assert play.reanchors == 1 and abs(play.behind_s) < 1e-6
    assert play.skipped_frames == 7  # 0.30 s late - 0.02 s already waited = 0.28 s = 7 frames
    video = {round(pts, 3): t for kind, pts, t in releases if kind == "v"}
    audio = {round(pts, 3): t for kind, pts, t in releases if kind == "a"}
    t0 = video[0.0]
    assert video[3.96] - t0 == pytest.approx(3.96, abs=1e-9)  # back on the original timeline
    # the left-out frames are gone from both tracks at the same pts; every released pts keeps A/V aligned
    missing_v = {round(k / FPS, 3) for k in range(100)} - set(video)
    assert len(missing_v) == 7
    assert all(round(pts, 3) not in audio and round(pts + 0.02, 3) not in audio for pts in missing_v)
    for pts, t in video.items():
        assert audio[pts] == pytest.approx(t)


async def test_speech_frames_are_never_left_out():
    clock = SimClock()
    play = Playout(frames(60, clock=clock, stall={10: 0.4}), FPS, clock, late_tolerance_s=0.1)
    sub = play.subscribe("rec", frames=100, audio=200)
    await play.run()
    assert play.skipped_frames == 0 and len(sub.frames) == 60


async def test_live_mic_leaves_out_unvoiced_frames_only():
    clock = SimClock()

    async def mic():
        async for f in frames(60, clock=clock, stall={10: 0.4}):
            f.voiced = f.index < 20  # someone talks, then room noise
            yield f

    play = Playout(mic(), FPS, clock, late_tolerance_s=0.1, live_input=True)
    sub = play.subscribe("rec", frames=100, audio=200)
    await play.run()
    seqs = []
    while len(sub.frames):
        seqs.append((await sub.frames.get()).seq)
    assert play.skipped_frames == 9 and all(s in seqs for s in range(20))


async def test_playout_drains_a_queue_of_idle_frames_down_to_its_cushion():
    """An engine that keeps idle frames 8 ahead of the clock: the playout leaves out idle frames until
    only the one-frame cushion waits in the engine, so speech that arrives next is not stuck behind them."""
    clock = SimClock()
    lead, opened = 8, clock.t
    current = {"k": 0}

    def ready() -> int:  # highest index the engine has made by now
        return int((clock.t - opened) * FPS) + lead

    async def engine():
        for k in range(200):
            if ready() < k:  # not made yet: the consumer waits for it
                clock.t = opened + (k - lead) / FPS
            current["k"] = k
            yield Frame(k, np.zeros((4, 4, 3), np.uint8), np.zeros(SPF, np.float32), speech=k >= 150)

    depths = []

    def depth() -> int:
        depths.append(ready() - current["k"])
        return depths[-1]

    play = Playout(engine(), FPS, clock, queue_depth=depth)
    sub = play.subscribe("rec", frames=300, audio=600)
    await play.run()
    assert depths[0] == lead  # at first 8 frames wait in the engine behind the one being played
    assert play.skipped_frames == lead - 2 and min(depths[-50:]) == 1  # then just the cushion
    seqs = []
    while len(sub.frames):
        seqs.append((await sub.frames.get()).seq)
    assert all(k in seqs for k in range(150, 200))  # speech is never left out
    assert play.reanchors == 0


async def test_webrtc_video_is_held_after_its_release_but_not_the_first_frame():
    """Chromium's lip sync delays the picture by its audio buffer only after 5-20 s; until then the picture
    led its sound. Each frame but the first goes out `hold_s` after its release (the first picture is not made
    later), and the sender reports still say the release time (the hold is no A/V offset to Chromium)."""
    from server.config import PlayoutConfig
    from server.rtc import PlayoutVideoTrack

    clock = SimClock()
    play = Playout(frames(6, clock=clock), FPS, clock)
    sub = play.subscribe("pc", frames=20, audio=40)
    held, plain = PlayoutVideoTrack(sub, hold_s=0.05), PlayoutVideoTrack(play.subscribe("b", frames=20, audio=None))
    await play.run()
    start = clock.t = 0.0                    # before every release: nothing is late yet
    await held.recv()
    assert clock.t == start                  # the first frame: at once
    for _ in range(3):
        await held.recv()
        assert clock.t == pytest.approx(held.sent_due + 0.05)
        second = 1 << 32
        assert held.report_ntp(7 * second) == 7 * second - round(0.05 * second)   # = its release time
    clock.t = 0.0
    for _ in range(4):
        await plain.recv()
    assert clock.t == 0.0                    # no hold: no waiting
    cfg = PlayoutConfig()
    assert cfg.webrtc_video_hold_ms > 0      # on by default
    # the queue keeps its spare frames besides the held ones (50 ms at 25 fps: 2 frames)
    assert cfg.webrtc_video_frames() >= cfg.video_queue_frames + 2
