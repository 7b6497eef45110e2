"""Server load: N concurrent bot sessions for T seconds against `emo-stream serve` on loopback.

Each bot streams speech in real time over the WebSocket API (utterances with pauses, as a voice
agent would), asks for the frames back (JPEG + audio + pts) and counts them. The server runs in
its own process, so its CPU and memory are measured apart from the bots'.

    python bench/server_load.py --sessions 4 --seconds 20 --size 512 --out bench/results/server_load-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import (  # bench/; puts the repo on sys.path
    device_name, emit_json, load_average, rss_mb, start_server_process, talking_in_real_time)
from emo_stream.registry import family_names
from emo_stream.pcm import float_to_pcm16
from server.bot_client import BotClient, ReceivedFrame


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def speech_clip() -> np.ndarray:
    """A few seconds of espeak-ng speech (16 kHz float), or tone bursts where espeak is missing."""
    from emo_stream.media import load_audio

    try:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "s.wav"
            subprocess.run(["espeak-ng", "-s", "160", "-w", str(wav),
                            "Thanks for calling. Let me check that for you, it will only take a moment."],
                           check=True, capture_output=True)
            return load_audio(wav)
    except (OSError, subprocess.CalledProcessError):
        t = np.arange(48000) / 16000
        return (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = ["--host", "127.0.0.1", "--port", "0", "--size", str(args.size), "--backend", args.backend,
           "--max-sessions", str(args.sessions + args.probe_latency)]
    if args.model:
        cmd += ["--model", args.model]
    if args.segment_frames:
        cmd += ["--segment-frames", str(args.segment_frames)]
    return start_server_process(cmd)


async def bot_session(url: str, clip: np.ndarray, seconds: float, pause_s: float) -> dict:
    async with BotClient(url, decode=False) as bot:
        info = await bot.start(sample_rate=16000, frames="jpeg")
        t_start = time.monotonic()
        frames = speech = finished = 0
        first = last = None
        async with talking_in_real_time(bot, clip, pause_s):
            async for item in bot.receive(timeout=10):
                now = time.monotonic()
                if isinstance(item, ReceivedFrame):
                    frames += 1
                    speech += item.speech
                    first = first or now
                    last = now
                elif item.get("type") == "playback_finished":
                    finished += 1
                if now - t_start >= seconds:
                    break
            stats = await bot.stats()
        await bot.stop()
    span = (last - first) if first and last and last > first else 1e-9
    return {
        "session": info["session"],
        "frames": frames,
        "speech_frames": speech,
        "fps": round((frames - 1) / span, 2) if frames > 1 else 0.0,
        "utterances_finished": finished,
        "latency_ms_p50": stats.get("latency_ms", {}).get("p50"),
        "latency_ms_p95": stats.get("latency_ms", {}).get("p95"),
        "late_frames": stats.get("playout", {}).get("late_frames"),
        "skipped_idle_frames": stats.get("playout", {}).get("skipped_idle_frames"),
        "engine_late_frames": stats.get("late_frames"),
        "dropped_frames": stats.get("dropped_frames"),
        "max_av_offset_ms": stats.get("playout", {}).get("max_av_offset_ms"),
    }


async def webrtc_viewer(url: str, seconds: float) -> dict:
    """An OBS-like WebRTC viewer of the latest session (aiortc as the browser): frames and audio received.
    Each viewer costs the server one video encode (VP8 in aiortc) and one Opus encode."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    counts = {"video": 0, "audio": 0}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tasks = []

    async def consume(track):
        try:
            while True:
                await track.recv()
                now = time.monotonic()
                counts[track.kind] += 1
                first.setdefault(track.kind, now)
                last[track.kind] = now
        except MediaStreamError:
            pass

    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(consume(track))))
    await pc.setLocalDescription(await pc.createOffer())
    async with BotClient(url) as ws:
        reply = await ws.request({"type": "view", "session": "latest",
                                  "webrtc": {"type": "offer", "sdp": pc.localDescription.sdp}})
        await pc.setRemoteDescription(RTCSessionDescription(**reply["answer"]))
        await asyncio.sleep(seconds)
        await pc.close()
    for t in tasks:
        t.cancel()
    fps = (counts["video"] - 1) / (last["video"] - first["video"]) if counts["video"] > 1 else 0.0
    audio_s = counts["audio"] * 0.02
    return {"video_fps": round(fps, 2), "video_frames": counts["video"], "audio_s": round(audio_s, 2)}


async def latency_probe(url: str, seconds: float) -> dict:
    """A talk-page-like WebRTC session (aiortc as the browser) whose "mic" sends a 1 kHz beep every
    1.5 s; the delay until the beep comes back in the avatar's audio is mic-to-avatar latency
    through WebRTC both ways, the engine and the playout (no browser capture/jitter buffers)."""
    import fractions

    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    sent: list[float] = []
    received: list[float] = []

    class BeepMic(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.n = 0
            self.t0 = None

        async def recv(self):
            if self.t0 is None:
                self.t0 = time.monotonic()
            due = self.t0 + self.n * 0.02
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            k = self.n % 75                   # 75 x 20 ms = 1.5 s period, beep for the first 5 packets
            t = (np.arange(960) + self.n * 960) / 48000
            x = 0.5 * np.sin(2 * np.pi * 1000 * t) if 0 < k <= 5 and self.n > 75 else np.zeros(960)
            if k == 1 and self.n > 75:
                sent.append(time.monotonic())
            frame = av.AudioFrame.from_ndarray(float_to_pcm16(x)[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, self.n * 960, fractions.Fraction(1, 48000)
            self.n += 1
            return frame

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(BeepMic())
    pc.addTransceiver("video", direction="recvonly")
    tasks = []

    async def listen(track):
        loud = False
        try:
            while True:
                frame = await track.recv()
                if track.kind != "audio":
                    continue
                x = frame.to_ndarray().astype(np.float32) / 32768
                level = float(np.sqrt(np.mean(x ** 2)))
                if level > 0.05 and not loud:
                    received.append(time.monotonic())
                loud = level > 0.02
        except MediaStreamError:
            pass

    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(listen(track))))
    await pc.setLocalDescription(await pc.createOffer())
    async with BotClient(url) as ws:
        reply = await ws.request({"type": "start", "webrtc": {"type": "offer", "sdp": pc.localDescription.sdp}})
        await pc.setRemoteDescription(RTCSessionDescription(**reply["answer"]))
        await asyncio.sleep(seconds)
        stats = await ws.stats()
        await pc.close()
    for t in tasks:
        t.cancel()
    delays = []
    for ts in sent:  # pair each beep with the first onset heard after it (within one period)
        later = [r - ts for r in received if 0 < r - ts < 1.5]
        if later:
            delays.append(1000 * min(later))
    return {
        "beeps_sent": len(sent), "beeps_heard": len(delays),
        "mic_to_avatar_audio_ms_p50": round(float(np.percentile(delays, 50)), 1) if delays else None,
        "mic_to_avatar_audio_ms_p95": round(float(np.percentile(delays, 95)), 1) if delays else None,
        "engine_latency_ms": stats.get("latency_ms"),
        "engine_output_queue_frames": stats.get("output_queue_frames"),
        "engine_input_queue_s": stats.get("input_queue_s"),
        "playout_behind_ms": stats.get("playout", {}).get("behind_ms"),
        "mic_dropped_s": stats.get("mic_dropped_s"),
    }


async def run_bots(url: str, args) -> list[dict]:
    clip = speech_clip()
    bots = [asyncio.create_task(bot_session(url, clip, args.seconds, args.pause)) for _ in range(args.sessions)]
    probe = asyncio.create_task(latency_probe(url, args.seconds)) if args.probe_latency else None
    viewers = []
    if args.viewers:
        await asyncio.sleep(1.0)  # sessions are up
        viewers = [asyncio.create_task(webrtc_viewer(url, args.seconds - 2)) for _ in range(args.viewers)]
        VIEWERS.clear()
    results = await asyncio.gather(*bots)
    if viewers:
        VIEWERS[:] = await asyncio.gather(*viewers)
    if probe is not None:
        PROBE.update(await probe)
    return list(results)


PROBE: dict = {}  # filled by the latency probe of the first round
VIEWERS: list = []  # WebRTC viewers (all watching the latest session) of the first round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--backend", choices=family_names(), default="preview")
    parser.add_argument("--model", default=None)
    parser.add_argument("--pause", type=float, default=1.0, help="silence between utterances (s)")
    parser.add_argument("--viewers", type=int, default=0, help="also attach this many WebRTC viewers (aiortc)")
    parser.add_argument("--probe-latency", action="store_true",
                        help="add a WebRTC mic session that measures beep -> avatar audio latency")
    parser.add_argument("--segment-frames", type=int, default=None, help="the server's engine segment size")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the load to check memory stays flat")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    load_before = load_average()
    proc, url = start_server(args)
    rss_rounds = []
    try:
        time.sleep(1.0)  # let start-up work settle before the baseline
        rss_before = rss_mb(proc.pid)
        cpu0, wall0 = proc_cpu_seconds(proc.pid), time.monotonic()
        timeline: list[float] = []
        sampling = threading.Event()

        def sample() -> None:  # RSS while streaming: must level off, not climb with time
            while not sampling.wait(5.0):
                timeline.append(round(rss_mb(proc.pid), 1))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sessions = asyncio.run(run_bots(url, args))
        sampling.set()
        cpu1, wall1 = proc_cpu_seconds(proc.pid), time.monotonic()
        rss_loaded = rss_mb(proc.pid)
        time.sleep(2.0)
        rss_after = rss_mb(proc.pid)
        rss_rounds.append(round(rss_after, 1))
        args.probe_latency = False
        for _ in range(args.rounds - 1):  # the same load again: memory must not keep growing
            asyncio.run(run_bots(url, args))
            time.sleep(2.0)
            rss_rounds.append(round(rss_mb(proc.pid), 1))
    finally:
        proc.terminate()
        proc.wait(10)
    fps = [s["fps"] for s in sessions]
    p95 = [s["latency_ms_p95"] for s in sessions if s["latency_ms_p95"] is not None]
    result = {
        "benchmark": "server_load",
        "device": device_name(detail=f"{os.cpu_count()} cores; the server process"),
        "backend": args.backend,
        "size": args.size,
        "sessions": args.sessions,
        "segment_frames": args.segment_frames or "config default",
        "seconds": args.seconds,
        "transport": "WebSocket bot API on loopback, 20 ms PCM16 messages in real time, JPEG frames back",
        "webrtc_viewers": args.viewers,
        "fps_per_session_min": min(fps, default=None),
        "fps_per_session_mean": round(statistics.mean(fps), 2) if fps else None,
        "latency_ms_p95_max": max(p95) if p95 else None,
        "server_cpu_percent": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
        "server_cpu_cores_used": round((cpu1 - cpu0) / (wall1 - wall0), 2),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_under_load": round(rss_loaded, 1),
        "rss_mb_every_5s_first_round": timeline,
        "rss_mb_after_close": round(rss_after, 1),
        "rss_mb_after_each_round": rss_rounds,
        "load_average_before": load_before,
        "note": "the machine is shared: load_average_before > cores means other work competed for the CPU",
        "latency_probe": PROBE or None,
        "webrtc_viewer_results": VIEWERS or None,
        "per_session": sessions,
    }
    emit_json(result, args.out, indent=1)


if __name__ == "__main__":
    main()
