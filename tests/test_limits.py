"""Limits that must hold under concurrency and against hostile clients (issue 23: viewers, connections per
address, buffered messages per connection, avatars per client), each raced for real on loopback sockets."""

from __future__ import annotations

import asyncio

import pytest

from server.app import StreamServer
from server.bot_client import BotClient, BotError
from server.config import load_config

SIZE = 64


@pytest.fixture(scope="module")
def backend():
    from emo_stream.registry import create_backend

    return create_backend("preview", size=SIZE)


async def _server(backend, **limits) -> StreamServer:
    cfg = load_config(None, port=0, size=SIZE, backend="preview")
    cfg.engine.vad = False
    cfg.sessions.max_sessions = 4
    # the clients share this process and its event loop: a loaded machine must not make them miss pings
    cfg.keepalive.ping_timeout_s = cfg.keepalive.reader_timeout_s = 30.0
    for name, value in limits.items():
        section = cfg.sessions if hasattr(cfg.sessions, name) else cfg.limits
        setattr(section, name, value)
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    return srv


async def _offer() -> tuple[dict, object]:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return {"type": "offer", "sdp": pc.localDescription.sdp}, pc


async def test_max_viewers_holds_when_200_views_arrive_at_once(backend):
    """200 connections send `view` for one session at the same moment against max_viewers 16: exactly 16
    get view_started, the rest a busy error (the limit was checked before an await and counted after)."""
    srv = await _server(backend, max_viewers=16, max_connections_per_address=256)
    offer, pc = await _offer()
    viewers: list[BotClient] = []
    try:
        async with BotClient(srv.base_url) as owner:
            info = await owner.start(frames="none")
            viewers = [BotClient(srv.base_url) for _ in range(200)]
            await asyncio.gather(*(v.connect() for v in viewers))

            async def view(v: BotClient) -> str:
                try:
                    await v.request({"type": "view", "session": info["session"], "webrtc": offer}, timeout=60)
                    return "ok"
                except BotError as exc:
                    return exc.code

            outcomes = await asyncio.gather(*(view(v) for v in viewers))
            assert outcomes.count("ok") == 16, {o: outcomes.count(o) for o in set(outcomes)}
            assert set(outcomes) == {"ok", "busy"}
            assert srv.sessions.get(info["session"]).viewers == 16
            await asyncio.gather(*(v.close() for v in viewers))
            viewers = []
            for _ in range(100):   # every view ended with its connection: the slots are free again
                if srv.sessions.get(info["session"]).viewers == 0:
                    break
                await asyncio.sleep(0.05)
            assert srv.sessions.get(info["session"]).viewers == 0
    finally:
        await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
        await pc.close()
        await srv.stop()


async def test_connections_per_address_are_limited(backend):
    """More connections from one address than limits.max_connections_per_address: the extra ones are
    closed (1013, try again later) even when they all arrive together; closing one frees its place."""
    srv = await _server(backend, max_connections_per_address=5)
    bots = [BotClient(srv.base_url) for _ in range(12)]
    try:
        await asyncio.gather(*(b.connect() for b in bots))

        async def alive(b: BotClient) -> bool:
            try:
                return (await b.request({"type": "ping"}, timeout=10))["type"] == "pong"
            except Exception:
                return False

        results = await asyncio.gather(*(alive(b) for b in bots))
        assert sum(results) == 5, results
        refused = [b for b, ok in zip(bots, results) if not ok]
        assert all(b.ws.close_code == 1013 for b in refused), [b.ws.close_code for b in refused]
        assert srv.health()["connections"] == 5
        await next(b for b, ok in zip(bots, results) if ok).close()
        for _ in range(100):
            if srv.health()["connections"] == 4:
                break
            await asyncio.sleep(0.02)
        async with BotClient(srv.base_url) as again:
            assert (await again.request({"type": "ping"}))["type"] == "pong"
    finally:
        await asyncio.gather(*(b.close() for b in bots), return_exceptions=True)
        await srv.stop()


# -- avatar uploads: decoded in another process, no stall for other sessions (issues 20.1 and 23.2) -------

def _bomb(i: int = 0) -> bytes:
    """A 5000x5000 one-bit PNG without a face: a few KB to send, 25 MP to decode, seconds of face search."""
    import io

    from PIL import Image

    picture = Image.new("1", (5000, 5000), 1)
    if i:
        picture.putpixel((i, i), 0)   # different bytes: not recognised as an upload already seen
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)   # every thread of this (the serving) process
    return usage.ru_utime + usage.ru_stime


async def _stream(url: str, speech, stop: asyncio.Event) -> list[float]:
    """A bot streaming speech in real time with JPEG frames back: the arrival time of each frame."""
    import time

    import numpy as np

    from server.bot_client import ReceivedFrame

    pcm = (speech * 32767).astype(np.int16)
    arrivals: list[float] = []
    async with BotClient(url, decode=False) as bot:
        await bot.start(frames="jpeg")

        async def sender():
            while True:
                for i in range(0, len(pcm), 320):
                    await bot.send_audio(pcm[i:i + 320])
                    await asyncio.sleep(0.02)
                await bot.end_segment()

        send = asyncio.create_task(sender())
        try:
            while not stop.is_set():
                try:
                    async for item in bot.receive(timeout=1.0):
                        if isinstance(item, ReceivedFrame):
                            arrivals.append(time.monotonic())
                        if stop.is_set():
                            break
                except BotError as exc:   # a frozen session: the gap shows in `arrivals`
                    if exc.code != "timeout":
                        raise
        finally:
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
    return arrivals


def _window(arrivals: list[float], t0: float, t1: float) -> tuple[float, float]:
    """(largest gap in ms, frames per second) of the frames that arrived between t0 and t1."""
    import numpy as np

    inside = [t0] + [t for t in arrivals if t0 <= t <= t1] + [t1]   # a stream that stopped is one long gap
    assert len(inside) > 12, "the session produced (almost) no frames"
    return float(np.diff(inside).max()) * 1000, (len(inside) - 1) / (inside[-1] - inside[0])


async def test_hostile_uploads_stall_no_other_session(backend, speech_16k):
    """Two sessions stream speech with JPEG frames; a third connection uploads a 5000x5000 one-bit PNG five
    times. Compared with the same sessions just before, in the same run: the serving process spends no
    decoding CPU (the work ran in a low-priority worker process), the frame rate holds and no frame gap
    grows. (Before the pool, each upload cost this process ~4 s of CPU: 0.4 s decode, ~3 s face search.)"""
    import os
    import time

    first, bomb = _bomb(1), _bomb()   # made before anything is measured (encoding them takes this loop ~1 s)
    srv = await _server(backend)
    try:
        stop = asyncio.Event()
        streams = [asyncio.ensure_future(_stream(srv.base_url, speech_16k, stop)) for _ in range(2)]
        async with BotClient(srv.base_url) as uploader:
            # the decode worker is started (models loaded) before anything is measured
            with pytest.raises(BotError, match="no face"):
                await uploader.upload_avatar(first, "image/png")
            await asyncio.sleep(1.0)
            quiet_from, cpu0 = time.monotonic(), _cpu_seconds()
            await asyncio.sleep(6.0)
            quiet_to, cpu1 = time.monotonic(), _cpu_seconds()
            answers = []
            for i in range(5):
                try:
                    await uploader.upload_avatar(bomb, "image/png")
                    answers.append("accepted")
                except BotError as exc:
                    answers.append(exc.code)
            busy_to, cpu2 = time.monotonic(), _cpu_seconds()
            pool = getattr(srv.avatars, "pool", None)   # checked last: the behaviour comes first
            workers = [(pid, os.getpriority(os.PRIO_PROCESS, pid)) for pid in getattr(pool, "last_pids", [])]
        stop.set()
        arrivals = await asyncio.gather(*streams)
    finally:
        await srv.stop()
    assert answers == ["bad_image"] * 5, answers   # no face: refused, never a crash
    # this process's CPU per frame delivered with the uploads: as without them (5 decodes here were ~20 s of
    # CPU); per frame, so a machine too busy to give this process more CPU still shows it
    frames = [sum(1 for times in arrivals for t in times if a <= t <= b)
              for a, b in ((quiet_from, quiet_to), (quiet_to, busy_to))]
    quiet_cost, busy_cost = (cpu1 - cpu0) / frames[0], (cpu2 - cpu1) / frames[1]
    assert busy_cost < 1.3 * quiet_cost, (quiet_cost, busy_cost, frames)
    # frame timing against the quiet phase: tolerant, because the 2-core machine is shared and other work
    # moves both phases (bench/upload_stall.py records the figures); a decode here used to freeze the
    # sessions for seconds (no frame for 10 s on this test, before the pool)
    for times in arrivals:
        quiet_gap, quiet_fps = _window(times, quiet_from, quiet_to)
        busy_gap, busy_fps = _window(times, quiet_to, busy_to)
        assert busy_fps >= 0.75 * quiet_fps, (quiet_fps, busy_fps)
        assert busy_gap <= max(500.0, 3 * quiet_gap), (quiet_gap, busy_gap)
    # the work ran in a worker process of lower priority than this (the serving) one
    assert pool is not None and pool.jobs_done == 6 and workers and workers[0][0] != os.getpid(), workers
    assert workers[0][1] >= os.getpriority(os.PRIO_PROCESS, 0) + 5, workers


# -- messages buffered per connection while its reader waits (issue 23.8) -------------------------------

def _serve(tmp_path, yaml_text: str):
    """`serve` in its own process (its RSS is then the server's alone): (process, http URL)."""
    from pathlib import Path

    from server.serve_process import start_serve_process

    config = tmp_path / "server.yaml"
    config.write_text(yaml_text)
    return start_serve_process(["--config", str(config), "--port", "0"], repo=Path(__file__).resolve().parents[1])


def _rss_mib(pid: int) -> float:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_a_waiting_reader_buffers_a_bounded_amount(tmp_path):
    """Four connections make the server wait (audio backpressure: the engine holds 0.5 s), then each sends
    twelve 8 MiB messages (the largest legal size, an upload's). While the server is not reading, websockets
    buffered up to max_queue=16 messages per connection (+274 MiB for four, issue 23); now at most two."""
    import json
    import threading
    import time
    from pathlib import Path

    from websockets.asyncio.client import connect

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc: RSS not measurable here")
    proc, url = _serve(tmp_path, f"size: {SIZE}\nbackend: preview\nsessions: {{max_sessions: 4}}\n"
                                 "engine: {input_seconds: 0.5, output_frames: 10, vad: false}\n"
                                 "keepalive: {ping_timeout_s: 30.0}\n")
    peak, sampling = [0.0], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            peak[0] = max(peak[0], _rss_mib(proc.pid))

    try:
        time.sleep(2.0)   # start-up settles
        before = _rss_mib(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        big = b"\0" * (8 * 2**20)
        audio = b"\0" * (256 * 1024)   # 8 s of 16 kHz PCM16 each: the engine's 0.5 s fill at once

        async def client() -> int:
            sent = 0
            async with connect(url.replace("http", "ws") + "/api/ws", max_size=None, compression=None) as ws:
                await ws.send(json.dumps({"type": "start", "audio": {"sample_rate": 16000}, "frames": "none"}))
                assert json.loads(await ws.recv())["type"] == "session_started"
                try:
                    async with asyncio.timeout(8.0):
                        for _ in range(12):   # the queue (8) fills: the server stops reading
                            await ws.send(audio)
                        for _ in range(12):
                            await ws.send(big)
                            sent += 1
                except TimeoutError:   # TCP pushes back once the server stops reading: as it should
                    pass
                await asyncio.sleep(2.0)
            return sent

        sent = await asyncio.gather(*(client() for _ in range(4)))
        sampling.set()
        sampler.join()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except Exception:
            proc.kill()
            raise
    grown = peak[0] - before
    print(f"server RSS {before:.0f} MiB -> peak {peak[0]:.0f} MiB (+{grown:.0f}); 8 MiB messages sent {sent}")
    # per connection: the message being handled, max_queue's frames and one being received, 8 MiB each
    assert grown < 4 * 3 * 8 + 40, (before, peak[0], sent)


# -- avatars owned by the client that uploaded them; uploads rate-limited per address (issue 23.9) -------

def _portraits(n: int) -> list[bytes]:
    """n different JPEG portraits with a face (the built-in one, a few pixels changed each)."""
    import io

    from PIL import Image

    from emo_stream.default_avatar import default_portrait

    base = default_portrait(192)
    out = []
    for i in range(n):
        picture = base.copy()
        picture[i // 8, i % 8] = (i * 37 % 256, 0, 255)   # a corner pixel: another photo, the same face
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def test_another_clients_uploads_cannot_evict_an_avatar(backend):
    """The victim uploads its portrait; another connection uploads 17 different ones (more than the 16
    places): the victim's avatar stays and its `start` works (it used to be dropped, least recently used)."""
    pictures = _portraits(18)
    srv = await _server(backend, avatar_uploads_per_minute=100.0)
    try:
        async with BotClient(srv.base_url) as victim, BotClient(srv.base_url) as other:
            mine = await victim.upload_avatar(pictures[0], "image/png")
            theirs = [await other.upload_avatar(p, "image/png") for p in pictures[1:]]
            assert len(set(theirs)) == 17 and mine not in theirs
            info = await victim.start(avatar=mine, frames="none")
            assert info["session"]
            # each connection holds at most its quota (4): the other's older ones were its own to lose
            cache = srv.engine.avatars
            held = sorted(len(cache.owned_by(o)) for o in {o for ids in cache._owners.values() for o in ids})
            assert held == [1, 4], held
    finally:
        await srv.stop()


async def test_uploads_are_rate_limited_per_address(backend):
    """Past limits.avatar_uploads_per_minute from one address, uploads are refused (rate_limited) before
    any decoding, on every connection from that address."""
    pictures = _portraits(4)
    srv = await _server(backend, avatar_uploads_per_minute=3.0)
    srv.avatars.rate.clock = lambda: 0.0   # no refill while the decodes take their time: counting only
    try:
        async with BotClient(srv.base_url) as first, BotClient(srv.base_url) as second:
            for p in pictures[:3]:
                await first.upload_avatar(p, "image/png")
            jobs = srv.avatars.pool.jobs_done
            with pytest.raises(BotError, match="too many uploads") as exc:
                await second.upload_avatar(pictures[3], "image/png")
            assert exc.value.code == "rate_limited" and srv.avatars.pool.jobs_done == jobs
            assert (await second.request({"type": "ping"}))["type"] == "pong"
    finally:
        await srv.stop()


# -- one decode policy for every image path (issue 23.2) ---------------------------------------------

_OTHER_FORMATS = ["TIFF", "BMP", "GIF", "ICO", "TGA", "SGI", "DDS", "EPS", "PPM", "PCX"]


def _encoded(fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    picture = Image.new("RGB", (64, 64), (200, 150, 120))
    try:
        picture.save(buf, format=fmt)
    except (KeyError, OSError, ValueError) as exc:   # this Pillow cannot write it: nothing to refuse
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", _OTHER_FORMATS)
def test_only_jpeg_png_and_webp_are_decoded_on_every_path(fmt, tmp_path):
    """TIFF, BMP, GIF, ICO, TGA, SGI, DDS, EPS (Ghostscript!) ... used to decode from LiveKit metadata and
    URLs: every path now refuses them by their magic bytes, before Pillow picks a decoder."""
    import base64

    from emo_stream.errors import ImageInputError
    from emo_stream.livekit.metadata import decode_image
    from emo_stream.media import image_from_bytes, load_image

    data = _encoded(fmt)
    path = tmp_path / f"portrait.{fmt.lower()}"
    path.write_bytes(data)
    for decode in (lambda: decode_image(base64.b64encode(data).decode()), lambda: image_from_bytes(data),
                   lambda: load_image(path)):
        with pytest.raises(ImageInputError, match="not a JPEG, PNG or WebP"):
            decode()


def test_pixels_are_bounded_from_the_header_on_every_path(tmp_path):
    """A PNG claiming 13000x13000 pixels (a 642 KiB one took the worker 1.3 GiB and 3.8 s): refused from
    its header, in the portrait pool too, with nothing decoded."""
    import base64
    import struct
    import zlib

    from emo_stream.errors import ImageInputError
    from emo_stream.livekit.metadata import decode_image
    from emo_stream.portrait_pool import PortraitPool

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    with pytest.raises(ImageInputError, match="13000x13000 is too large"):
        decode_image(base64.b64encode(png).decode())
    pool = PortraitPool(detect_faces=False)
    try:
        with pytest.raises(ImageInputError, match="13000x13000 is too large"):
            decode_image(base64.b64encode(png).decode(), pool=pool)
        with pytest.raises(ImageInputError, match="not a JPEG, PNG or WebP"):
            pool.decode(_encoded("BMP"))
        ok = pool.decode(_encoded("PNG"))
        assert ok.image.shape == (64, 64, 3) and ok.face is None
    finally:
        pool.close()


def test_portrait_pool_limits_time_memory_and_queue():
    """A decode past timeout_s has its worker killed and replaced; one past memory_mb fails with a clear
    error in the worker (the serving process never allocates it); more than workers + max_waiting jobs at
    once are refused at once (busy)."""
    from emo_stream.errors import ImageInputError
    from emo_stream.portrait_pool import PoolLimits, PortraitPool, PortraitPoolBusy

    small, bomb = _encoded("PNG"), _bomb()
    slow = PortraitPool(PoolLimits(timeout_s=0.3, max_waiting=1))   # face search on a blank 25 MP PNG: seconds
    try:
        slow.warm()
        assert slow.decode(small).image.shape == (64, 64, 3)   # started; the next job is timed alone
        first = slow.last_pids[0]
        jobs = [slow.submit(bomb, what="avatar"), slow.submit(bomb, what="avatar")]
        with pytest.raises(PortraitPoolBusy):
            slow.submit(small)   # one running, one waiting: the queue is full
        for job in jobs:
            with pytest.raises(ImageInputError, match="longer than 0.3 s"):
                job.result()
        assert slow.workers_killed == 2
        slow.limits = PoolLimits(timeout_s=60.0)   # a fresh worker takes the next job
        assert slow.decode(small).image.shape == (64, 64, 3) and slow.last_pids[0] != first
    finally:
        slow.close()
    tight = PortraitPool(PoolLimits(memory_mb=8), detect_faces=False)   # 25 MP at a byte each does not fit
    try:
        with pytest.raises(ImageInputError, match="more memory"):
            tight.decode(bomb)
        assert tight.decode(small).image.shape == (64, 64, 3)   # the same worker goes on
    finally:
        tight.close()


def test_a_decode_workers_pipe_is_closed_once_when_two_threads_end_it():
    """The server's close() and a driver thread can end the same worker at once; the second close of the
    pipe raised EBADF out of the server's stop (seen in CI), and could close an fd opened meanwhile."""
    import threading
    import time

    from emo_stream.portrait_pool import _Worker

    closes = []

    class SlowPipe:
        def close(self):
            closes.append(1)
            time.sleep(0.05)   # both threads are inside close() unless it is serialised

    worker = _Worker.__new__(_Worker)   # no process: only the pipe's close is under test
    worker.conn, worker._close_lock, worker._pipe_closed = SlowPipe(), threading.Lock(), False
    threads = [threading.Thread(target=worker._close_pipe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert closes == [1]
