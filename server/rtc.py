"""WebRTC with aiortc: tracks that play a session's Playout, the browser's mic into the engine, SDP answers."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.sync import AUDIO_RATE, VIDEO_CLOCK_RATE, QueueClosed, Subscription

log = logging.getLogger(__name__)


class _PlayoutTrack(MediaStreamTrack):
    """What both WebRTC tracks share: where they start in the subscription, and the release time of the
    frame or chunk the sender is sending (for its RTCP sender reports, see PlayoutClockSender)."""

    RTP_RATE = 1   # the RTP clock of the track's media pts

    def __init__(self, sub: Subscription, stamp_bias_s: float = 0.0, join_live: bool = False):
        super().__init__()
        self._sub = sub
        self._join_live = join_live
        self._bias = stamp_bias_s
        self.sent_due: float | None = None   # release time (Playout clock) of what recv() last handed out
        self._handed: collections.deque[tuple[int, float]] = collections.deque(maxlen=8)   # (pts, due) recent
        self._rtp_offset: int | None = None   # RTP timestamp - pts (mod 2^32), from the first packet

    @staticmethod
    def _pts(item) -> int:
        raise NotImplementedError

    def _queue(self):
        raise NotImplementedError

    async def _next(self):
        queue = self._queue()
        if self._join_live:
            # The subscription fills from when the offer is answered; the sender first asks after ICE and
            # DTLS (0.1-0.5 s later). Sending that backlog at once starts the browser's jitter buffers
            # deep (audio 200 ms, video 120 ms): start at the newest entry instead.
            self._join_live = False
            if hasattr(queue, "keep_newest"):
                queue.keep_newest(1)
        try:
            item = await queue.get()
        except QueueClosed:
            self.stop()
            raise MediaStreamError from None
        self.sent_due = getattr(item, "due", None)
        if self.sent_due is not None:
            self._handed.append((self._pts(item), self.sent_due))
        return item

    def report_ntp(self, sent_ntp: int, rtp: int | None = None) -> int:
        """The NTP time (RFC 3550 64-bit) an RTCP sender report should give the packet just sent: its
        release time (plus this track's bias) instead of the moment it left, `sent_ntp`. With its RTP
        timestamp `rtp`, the release time of the media at that RTP time: after a gap (chunks dropped from the
        queue) Opus stamps the next packet as if none had gone (its look-ahead starts in the chunk before)."""
        clock = getattr(getattr(self._sub, "playout", None), "clock", None)
        if self.sent_due is None or clock is None:
            return sent_ntp
        due = self.sent_due if rtp is None else self._due_at(rtp)
        late = clock.now() - (due + self._bias)
        return sent_ntp - int(round(late * (1 << 32)))

    def _due_at(self, rtp: int) -> float:
        """Release time of the media at RTP time `rtp` (the first packet is the entry last handed out)."""
        last_pts, last_due = self._handed[-1]
        if self._rtp_offset is None:
            self._rtp_offset = (rtp - last_pts) & 0xFFFFFFFF
        ahead = (rtp - self._rtp_offset - last_pts) & 0xFFFFFFFF   # unwrapped near the newest entry
        pts = last_pts + (ahead - (1 << 32) if ahead >= 1 << 31 else ahead)
        base_pts, base_due = next(((p, d) for p, d in reversed(self._handed) if p <= pts), self._handed[0])
        return base_due + (pts - base_pts) / self.RTP_RATE

    def stop(self) -> None:
        super().stop()
        self._sub.close()


class PlayoutVideoTrack(_PlayoutTrack):
    """Video frames of one subscription; pacing happened upstream (the Playout), so recv() just waits.

    `delay_s` shows the picture that much after its sound in a browser: the sender reports stamp each
    frame `delay_s` after its release (Chromium's lip sync follows the reports), the frame itself is not
    held back by it.

    `hold_s` sends each frame but the first that long after its release (the reports still say the release
    time). The receiver's audio waits 40-200 ms in its jitter buffer and output; Chromium's lip sync delays
    the picture to match only after 5-20 s (it needs two sender reports per track, then moves by half the
    filtered difference a second, nothing under 30 ms), and until then the picture led its sound by about
    that buffer (bench/av_sync.py: -60..-190 ms in the first 9 s of a talk page). Held, the picture starts
    near its sound; once Chromium syncs, the hold only replaces part of its own video delay. The first frame
    goes at once: the first picture is not made later."""

    kind = "video"
    RTP_RATE = VIDEO_CLOCK_RATE

    def __init__(self, sub: Subscription, delay_s: float = 0.0, join_live: bool = False, hold_s: float = 0.0):
        super().__init__(sub, stamp_bias_s=max(0.0, delay_s), join_live=join_live)
        self._hold = max(0.0, hold_s)
        self._shown_first = False

    @staticmethod
    def _pts(item) -> int:
        return item.video_pts

    def _queue(self):
        return self._sub.frames

    async def recv(self):
        item = await self._next()
        clock = getattr(getattr(self._sub, "playout", None), "clock", None)
        if self._hold and self._shown_first and clock is not None and self.sent_due is not None:
            await clock.sleep_until(self.sent_due + self._hold)
        self._shown_first = True
        return item.video_frame()


class PlayoutAudioTrack(_PlayoutTrack):
    """20 ms 48 kHz chunks of the same subscription: released on the same clock as the video."""

    kind = "audio"
    RTP_RATE = AUDIO_RATE

    def __init__(self, sub: Subscription, join_live: bool = False):
        super().__init__(sub, join_live=join_live)

    @staticmethod
    def _pts(item) -> int:
        return item.pts

    def _queue(self):
        return self._sub.audio

    async def recv(self):
        return (await self._next()).audio_frame()


class PlayoutClockSender(RTCRtpSender):
    """An aiortc sender whose RTCP sender reports map each packet's RTP time to when the Playout released it.

    Chromium plays a stream's audio and video in sync by these reports (NTP time <-> RTP time per track).
    aiortc stamps the moment a packet left, so whatever delayed one track's sending and not the other's
    (a VP8 encode, a busy event loop, the backlog sent at once when a connection starts, a 75 ms delay
    line that once stood in for this) became an A/V offset that Chromium's synchronizer then followed
    over 10-20 s: the picture led the sound by up to 250 ms early in a session. Both tracks are released
    on one clock, so stamping release times makes the reports agree exactly, however the sending went.
    (aiortc has no hook for it: the class swaps in a property for its private per-packet stamp.)"""

    @staticmethod
    def adopt(sender: RTCRtpSender) -> RTCRtpSender:
        if not all(name in sender.__dict__ for name in (_NTP_ATTR, _RTP_ATTR)):   # aiortc renamed them: say so
            log.warning("this aiortc has no RTCRtpSender.__ntp_timestamp/__rtp_timestamp: sender reports keep "
                        "send times (the browser's lip sync then follows whatever delays one track's sending)")
        sender.__class__ = PlayoutClockSender
        return sender


_NTP_ATTR, _RTP_ATTR = "_RTCRtpSender__ntp_timestamp", "_RTCRtpSender__rtp_timestamp"   # aiortc's private names


def _get_ntp(self) -> int:
    return self.__dict__.get("_playout_ntp", 0)


def _set_ntp(self, sent_ntp: int) -> None:   # aiortc sets it after each packet it sends, then the RTP time
    track = self.track
    stamp = getattr(track, "report_ntp", None)
    self.__dict__["_sent_ntp"] = sent_ntp
    self.__dict__["_playout_ntp"] = stamp(sent_ntp) if stamp is not None and sent_ntp else sent_ntp


def _get_rtp(self) -> int:
    return self.__dict__.get("_playout_rtp", 0)


def _set_rtp(self, rtp: int) -> None:   # the packet's own RTP time: its release time, whatever the encoder did
    self.__dict__["_playout_rtp"] = rtp
    sent_ntp = self.__dict__.get("_sent_ntp", 0)
    stamp = getattr(self.track, "report_ntp", None)
    if stamp is not None and sent_ntp:
        self.__dict__["_playout_ntp"] = stamp(sent_ntp, rtp)


setattr(PlayoutClockSender, _NTP_ATTR, property(_get_ntp, _set_ntp))
setattr(PlayoutClockSender, _RTP_ATTR, property(_get_rtp, _set_rtp))


def _add_playout_track(pc: RTCPeerConnection, track: _PlayoutTrack) -> None:
    PlayoutClockSender.adopt(pc.addTrack(track))


async def pump_mic(track: MediaStreamTrack, session: Any, max_backlog_s: float) -> None:
    """Browser mic (Opus decoded by aiortc: 48 kHz s16) -> session.push_audio.

    A live mic must stay live: when the engine is behind by more than max_backlog_s the audio is
    dropped (and counted) instead of queueing; aiortc's own receive queue is drained promptly.
    """
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        pcm = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if frame.format.is_planar and channels > 1:
            pcm = pcm.T  # (channels, n) -> interleaved
        pcm = np.ascontiguousarray(pcm).reshape(-1)
        if pcm.dtype != np.int16:
            pcm = pcm.astype(np.float32)
        session.received(frame.samples / frame.sample_rate)
        if session.input_backlog_s() > max_backlog_s:
            session.mic_dropped_s += frame.samples / frame.sample_rate
            continue
        await session.push_audio(pcm, sample_rate=frame.sample_rate, channels=channels)


def _set_mic_jitter_buffer(pc: RTCPeerConnection, packets: int) -> None:
    """aiortc holds 4 audio packets (80 ms) before decoding, a quarter of the glass-to-glass budget; it has
    no public setting, so the audio receivers get a buffer of our size before any packet arrives."""
    from aiortc.jitterbuffer import JitterBuffer

    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio":
            continue
        if not hasattr(receiver, _JITTER_ATTR):   # aiortc renamed its private attribute: say so
            log.warning("this aiortc has no RTCRtpReceiver.__jitter_buffer: mic_jitter_packets is ignored "
                        "(aiortc's default 4-packet buffer adds ~60 ms of mic latency)")
            continue
        setattr(receiver, _JITTER_ATTR, JitterBuffer(capacity=16, prefetch=packets))


_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"   # aiortc's name-mangled private attribute


async def _answer(sdp: str, configure: Callable[[RTCPeerConnection, list[Subscription]], None], *,
                  on_mic: Callable[[MediaStreamTrack], None] | None, on_closed: Callable[[], Any] | None,
                  peer: str | None, local: str | None) -> tuple[RTCPeerConnection, RTCSessionDescription]:
    """What every answer does: a peer connection whose closing runs on_closed once and whose incoming audio
    goes to on_mic, the policed offer applied, `configure(pc, subs)` (checks the sections, adds our tracks,
    appends the subscriptions it opened to subs), the answer made and policed. On any error nothing is left
    open."""
    # no ICE servers: loopback/LAN use needs none, and the library default (a public STUN server)
    # would stall gathering on machines without internet
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    fired = False
    subs: list[Subscription] = []

    @pc.on("connectionstatechange")
    async def _state() -> None:
        nonlocal fired
        log.debug("peer connection %s", pc.connectionState)
        if pc.connectionState in ("failed", "closed") and not fired:
            fired = True
            if on_closed is not None:
                result = on_closed()
                if asyncio.iscoroutine(result):
                    await result

    @pc.on("track")
    def _track(track: MediaStreamTrack) -> None:
        if track.kind == "audio" and on_mic is not None:
            on_mic(track)

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=_policed_offer(sdp, peer), type="offer"))
        configure(pc, subs)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception:
        fired = True  # the caller gets the error instead: it never saw this connection, so no on_closed
        for sub in subs:
            sub.close()
        await pc.close()
        raise
    return pc, _policed_answer(pc.localDescription, peer, local)


def _add_playout_tracks(pc: RTCPeerConnection, sub: Subscription, video: bool, audio: bool,
                        video_delay_s: float, video_hold_s: float) -> None:
    if video:
        _add_playout_track(pc, PlayoutVideoTrack(sub, video_delay_s, join_live=True, hold_s=video_hold_s))
    if audio:
        _add_playout_track(pc, PlayoutAudioTrack(sub, join_live=True))


async def answer_offer(sdp: str, sub: Subscription, *, on_mic: Callable[[MediaStreamTrack], None] | None = None,
                       on_closed: Callable[[], Any] | None = None,
                       mic_jitter_packets: int | None = None,
                       video_delay_s: float = 0.0, video_hold_s: float = 0.0, peer: str | None = None,
                       local: str | None = None) -> tuple[RTCPeerConnection, RTCSessionDescription]:
    """Answer a browser's offer: our video+audio tracks go out on its transceivers; its mic comes in via on_mic.

    on_closed runs once when the connection fails or closes (tab closed, network dropped).
    """
    def configure(pc: RTCPeerConnection, subs: list[Subscription]) -> None:
        subs.append(sub)
        kinds = {t.kind for t in pc.getTransceivers()}
        missing = {"audio", "video"} - kinds
        if missing:  # else aiortc fails later with "None is not in list"
            raise ValueError(f"the offer has no {' or '.join(sorted(missing))} section: the avatar is sent "
                             "as video and audio (add recvonly transceivers for both)")
        if mic_jitter_packets is not None:
            _set_mic_jitter_buffer(pc, mic_jitter_packets)
        _add_playout_tracks(pc, sub, True, True, video_delay_s, video_hold_s)

    try:
        return await _answer(sdp, configure, on_mic=on_mic, on_closed=on_closed, peer=peer, local=local)
    except Exception:
        sub.close()   # also when the offer itself was refused (before configure took it)
        raise


# directions in an offer, from the offerer's side; a media section without one is sendrecv (RFC 8866)
_CLIENT_RECEIVES = ("sendrecv", "recvonly")
_CLIENT_SENDS = ("sendrecv", "sendonly")


def offered_media(sdp: str) -> list[tuple[str, str]]:
    """(kind, direction) of each audio/video section of an SDP offer; ValueError when it is no SDP.

    aiortc's parser accepts much that is not SDP (it skips lines it does not know), so the session
    line and at least one media section are checked here first."""
    from aiortc.sdp import SessionDescription

    if not sdp.startswith("v=0") or "\nm=" not in sdp.replace("\r\n", "\n"):
        raise ValueError("not an SDP offer: it must start with v=0 and have m= media sections (RFC 8866)")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise ValueError(f"malformed SDP ({exc.__class__.__name__}: {exc})" if str(exc) else
                         "malformed SDP: a line (m=, a=, c=, ...) does not have the form RFC 8866 gives it") from None
    return [(m.kind, m.direction or "sendrecv") for m in parsed.media if m.kind in ("audio", "video")]


async def answer_media_offer(sdp: str, subscribe: Callable[[bool, bool], Subscription], *,
                             need_audio_in: bool,
                             on_mic: Callable[[MediaStreamTrack], None] | None = None,
                             on_closed: Callable[[], Any] | None = None,
                             mic_jitter_packets: int | None = None,
                             video_delay_s: float = 0.0, video_hold_s: float = 0.0, peer: str | None = None,
                             local: str | None = None) -> tuple[RTCPeerConnection, RTCSessionDescription]:
    """Answer an offer from a standard client (WHIP, WHEP) that may carry any mix of media sections.

    The avatar's video and audio go out on the sections the client receives on (recvonly/sendrecv);
    `subscribe(video, audio)` is asked for a playout subscription with just those. With
    `need_audio_in` the offer must send audio (the avatar's input, delivered through on_mic); video
    the client sends is declined (answered inactive: no decoding cost). ValueError says what is wrong
    with an offer that cannot be used.
    """
    media = offered_media(sdp)
    receives = {kind for kind, direction in media if direction in _CLIENT_RECEIVES}
    sends_audio = any(kind == "audio" and direction in _CLIENT_SENDS for kind, direction in media)
    if need_audio_in and not sends_audio:
        raise ValueError("the offer sends no audio: a WHIP client must send the speech that drives the avatar "
                         "(an audio section with sendonly or sendrecv)")
    if not need_audio_in and not receives:
        raise ValueError("the offer receives no media: add recvonly audio and/or video sections")

    def configure(pc: RTCPeerConnection, subs: list[Subscription]) -> None:
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video" and "video" not in receives:
                transceiver.direction = "inactive"   # the client's camera is not ours to decode
        if mic_jitter_packets is not None and need_audio_in:
            _set_mic_jitter_buffer(pc, mic_jitter_packets)
        if receives:
            subs.append(subscribe("video" in receives, "audio" in receives))
            _add_playout_tracks(pc, subs[-1], "video" in receives, "audio" in receives, video_delay_s,
                                video_hold_s)

    return await _answer(sdp, configure, on_mic=on_mic, on_closed=on_closed, peer=peer, local=local)


def _policed_offer(sdp: str, peer: str | None) -> str:
    """With the client's address known (`peer`), only the ICE candidates server.ice_policy allows."""
    from server.ice_policy import filter_offer

    return sdp if peer is None else filter_offer(sdp, peer)


def _policed_answer(answer: RTCSessionDescription, peer: str | None, local: str | None) -> RTCSessionDescription:
    """The answer showing only the server addresses the client needs (server.ice_policy)."""
    from server.ice_policy import filter_answer

    if peer is None:
        return answer
    return RTCSessionDescription(sdp=filter_answer(answer.sdp, peer, local), type=answer.type)
