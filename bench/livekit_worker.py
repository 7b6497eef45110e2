"""The LiveKit avatar worker's own cost and its lips-vs-sound offset, without a LiveKit server.

    python bench/livekit_worker.py --rooms 4 --seconds 8
    python bench/livekit_worker.py --backend emo --model sd15 --device cuda --rooms 4   # on a GPU machine

N rooms, each an agent (livekit-agents' DataStreamAudioOutput) and our worker job (its own thread and
loop: DataStreamAudioReceiver + AvatarRunner + EngineVideoGenerator) joined through the in-process
room stand-in of the tests (tests/livekit_standin.py: no network, no WebRTC encoding). Every agent
speaks utterances of ~1.6 s with 0.4 s pauses for --seconds. Prints JSON: the device, CPU cores used
by the whole process per room, the published video fps per room (the AVSynchronizer's), and the
offset between the first speaking video frame of each utterance reaching the video source and its
first audio sample leaving the audio source (positive: the sound comes after the picture), as the
worker publishes them; the SFU and the viewer's jitter buffers come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
import time

import numpy as np

from _common import REPO, device_name, emit_json, load_average, rss_mb  # bench/; puts the repo on sys.path

sys.path.insert(0, str(REPO / "tests"))

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import DataStreamAudioOutput  # noqa: E402
from livekit_standin import Hub, LoopThread, StandInRoom  # noqa: E402

from emo_stream.registry import family_names, create_backend  # noqa: E402
from emo_stream.livekit.host import EngineHost  # noqa: E402
from emo_stream.livekit.job import run_avatar_job  # noqa: E402
from emo_stream.livekit.metadata import DispatchInfo  # noqa: E402
from emo_stream.streaming import EngineConfig, StreamingEngine  # noqa: E402

RATE = 24000
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


def utterance(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    env = 0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 3 * t))
    x = (env * 9000 * np.sin(2 * np.pi * (150 + 60 * rng.random()) * t)).astype(np.int16)
    x[x == 0] = 1
    return x


class Room:
    def __init__(self, hub: Hub, host: EngineHost, avatar, n: int) -> None:
        self.info = DispatchInfo(avatar_identity=f"avatar-{n}", sender_identity=f"agent-{n}", sample_rate=RATE)
        self.worker_room = StandInRoom(hub, f"room-{n}", self.info.avatar_identity, kind=AGENT)
        self.agent_room = StandInRoom(hub, f"room-{n}", f"agent-{n}", kind=AGENT)
        self.thread = LoopThread(f"job-{n}")
        self.started = asyncio.Event()
        self.pushed: list[tuple[float, int]] = []     # (time, id) of every video frame handed to the synchronizer
        self.captured: list[tuple[float, int]] = []   # (time, id) of every video frame reaching the video source
        self.audio_starts: list[float] = []    # time each utterance's first sample leaves the audio source
        self.runner = self.generator = None
        loop = asyncio.get_running_loop()
        assert host.reserve()

        def on_started(runner, generator) -> None:
            import collections

            generator.trace = collections.deque(maxlen=1_000_000)
            self.runner, self.generator = runner, generator
            source = runner.av_sync._video_source        # private: the bench stamps each captured frame
            capture, push = source.capture_frame, runner.av_sync.push

            def stamped(frame, *a, **k):
                self.captured.append((time.monotonic(), id(frame)))
                return capture(frame, *a, **k)

            async def stamped_push(frame, *a, **k):
                if isinstance(frame, rtc.VideoFrame):
                    self.pushed.append((time.monotonic(), id(frame)))
                return await push(frame, *a, **k)

            source.capture_frame = stamped
            runner.av_sync.push = stamped_push
            loop.call_soon_threadsafe(self.started.set)

        async def job() -> None:
            await self.worker_room.connect()
            await run_avatar_job(self.worker_room, host, self.info, avatar, on_started=on_started)

        self.done = self.thread.submit(job())

    async def connect_agent(self) -> None:
        await self.agent_room.connect()
        self.out = DataStreamAudioOutput(self.agent_room, destination_identity=self.info.avatar_identity,
                                         sample_rate=RATE, wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                                         wait_playback_start=True)

    async def speak(self, seconds: float, seed: int) -> None:
        out = self.out
        track = next(p.track for p in await self._published() if p.kind == rtc.TrackKind.KIND_AUDIO)
        tap = asyncio.ensure_future(self._tap(track))
        t_end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < t_end:
            pcm = utterance(1.6, seed * 1000 + k)
            for i in range(0, len(pcm), 480):
                part = pcm[i:i + 480]
                await out.capture_frame(rtc.AudioFrame(part.tobytes(), RATE, 1, len(part)))
            out.flush()
            await out.wait_for_playout()
            await asyncio.sleep(0.4)
            k += 1
        tap.cancel()

    async def _published(self):
        while len(self.worker_room.published) < 2:
            await asyncio.sleep(0.01)
        return self.worker_room.published

    async def _tap(self, track) -> None:
        stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
        voiced = False
        try:
            async for ev in stream:
                x = np.frombuffer(ev.frame.data, dtype=np.int16)
                nz = np.flatnonzero(x)
                if len(nz) and not voiced:
                    self.audio_starts.append(time.monotonic() - (len(x) - nz[0]) / RATE)
                # a pause of a whole 10 ms chunk of silence ends the utterance
                voiced = bool(len(nz))
        finally:
            await stream.aclose()

    def offsets_ms(self) -> list[float]:
        """Per utterance: first audio sample out minus first speaking frame into the video source."""
        trace = list(self.generator.trace)
        video_index, starts, prev_speech = 0, [], False
        for kind, speech in trace:
            if kind != "video":
                continue
            if speech and not prev_speech and video_index < len(self.pushed):
                t_push, frame_id = self.pushed[video_index]
                starts.append(next((t for t, i in self.captured if i == frame_id and t >= t_push), None))
            prev_speech = speech
            video_index += 1
        return [round(1000 * (a - v), 1) for a, v in zip(self.audio_starts, starts) if v is not None]


async def run(args) -> dict:
    backend = create_backend(args.backend, args.model, size=args.size, device=args.device)
    host = EngineHost(StreamingEngine(backend, EngineConfig(max_sessions=args.rooms, max_batch=args.rooms,
                                                            segment_frames=args.segment_frames)))
    await host.start()
    from emo_stream.default_avatar import default_portrait

    avatar = await host.prepare_avatar("default", lambda: default_portrait(512))
    hub = Hub()
    rooms = [Room(hub, host, avatar, n) for n in range(args.rooms)]
    for r in rooms:
        await r.connect_agent()
    await asyncio.gather(*(r.started.wait() for r in rooms))
    await asyncio.sleep(1.0)
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await asyncio.gather(*(r.speak(args.seconds, n) for n, r in enumerate(rooms)))
    usage1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
    cores = (usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime) / wall
    fps = [round(r.runner.av_sync.actual_fps, 1) for r in rooms]
    offsets = [o for r in rooms for o in r.offsets_ms()]
    for r in rooms:
        await r.thread.submit(r.worker_room.disconnect())
        await r.done
        r.thread.close()
    await host.stop()
    return {
        "bench": "livekit_worker",
        "device": device_name(getattr(backend, "device", None)),
        "backend": args.backend or "preview", "model": args.model, "size": args.size,
        "segment_frames": args.segment_frames, "rooms": args.rooms, "seconds": round(wall, 1),
        "cores_used": round(cores, 2), "cores_per_room": round(cores / args.rooms, 3),
        "published_fps_per_room": fps,
        "lips_to_sound_offset_ms": {"n": len(offsets),
                                    "p50": float(np.percentile(offsets, 50)) if offsets else None,
                                    "min": min(offsets, default=None), "max": max(offsets, default=None)},
        "rss_mb": round(rss_mb(), 1), "load_average": load_average(),
        "note": "in-process room stand-in: no network, no WebRTC encoding (the LiveKit SDK encodes in its "
                "native thread in a real room, on top of this)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=family_names(), default="preview")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rooms", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--segment-frames", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    emit_json(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
