"""A/V sync measured with the synctest pattern (emo_stream/families/synctest): each frame's flash is drawn from the
audio it carries, so where the flashes sit against the sound says how far picture and sound are apart. Real server,
WebSocket API, JPEG frames. Asserts structure (which audio a picture was drawn from), never the machine's speed."""

from __future__ import annotations

import numpy as np
import pytest

from emo_stream.families.synctest.backend import SyncTestBackend, draw_pattern, read_pattern
from emo_stream.families.synctest.measure import beeps, burst_offsets, offsets_of_frames
from server.app import StreamServer
from server.bot_client import BotClient, ReceivedFrame
from server.config import load_config

SIZE = 64
FPS = 25


def test_pattern_reads_back_after_jpeg():
    import io

    from PIL import Image

    for level, counter in [(0, 0), (37, 1), (128, 0xBEEF), (255, 0xFFFF)]:
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        draw_pattern(img, level, counter)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=60)
        got_level, got_counter = read_pattern(np.asarray(Image.open(buf)))
        assert got_counter == counter
        assert got_level == pytest.approx(level / 255, abs=0.02)


def test_fit_finds_a_known_shift_and_only_that():
    """The estimator on made-up data: frames shown 17 ms late are measured 17 ms late (a shift inside one frame)."""
    backend = SyncTestBackend(size=SIZE)
    x = beeps(5.0)
    spf = 16000 // FPS
    levels = np.round(backend.encode_audio(x, 0, len(x) // spf) / (2 / np.pi) * 255) / 255
    times = np.arange(len(levels)) / FPS
    blocks = np.abs(x[:len(x) // 16 * 16]).reshape(-1, 16).mean(axis=1)
    for shift in (0.0, 0.017, -0.031):
        found = burst_offsets(times + shift, levels, np.arange(len(blocks)) * 16 / 16000, blocks, 1 / FPS)
        assert len(found) == 5
        assert [o.offset for o in found] == pytest.approx([shift] * 5, abs=0.0015)


async def test_websocket_frames_carry_the_flash_of_their_own_audio():
    cfg = load_config(None, port=0, size=SIZE, backend="synctest")
    cfg.engine.vad = False          # a tone is no speech to silero; the energy detector hears it
    srv = StreamServer(cfg, backend=SyncTestBackend(size=SIZE, fps=FPS))
    await srv.start()
    try:
        x = beeps(4.6)
        async with BotClient(srv.base_url) as bot:
            await bot.start(sample_rate=16000, frames="jpeg")
            for i in range(0, len(x), 3200):
                await bot.send_audio(x[i:i + 3200])
            await bot.end_segment()
            frames = []
            async for item in bot.receive(timeout=20):
                if isinstance(item, ReceivedFrame):
                    if item.speech:
                        frames.append(item)
                elif item.get("type") == "playback_finished":
                    break
            await bot.stop()
    finally:
        await srv.stop()

    assert len(frames) == -(-len(x) // 640)
    counters = [read_pattern(f.image)[1] for f in frames]
    assert all(b > a for a, b in zip(counters, counters[1:]))   # every frame newly drawn, in order
    found = offsets_of_frames(frames, FPS)
    assert len(found) == 5 and all(o.score > 0.95 for o in found)
    offsets_ms = [1000 * o.offset for o in found]
    # each picture carries the flash of its own audio: within a frame, and the median within a tenth of one
    assert all(abs(o) < 1000 / FPS for o in offsets_ms), offsets_ms
    assert abs(float(np.median(offsets_ms))) < 0.1 * 1000 / FPS, offsets_ms


async def test_a_shifted_picture_is_measured_as_shifted():
    """The case that must fail: frames drawn from the previous frame's audio read one frame late."""
    backend = SyncTestBackend(size=SIZE, fps=FPS)
    x = beeps(3.5)
    spf = 16000 // FPS
    n = len(x) // spf
    levels = backend.encode_audio(np.concatenate([np.zeros(spf, np.float32), x]), 0, n)   # one frame behind
    frames = []
    for k in range(n):
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        draw_pattern(img, int(np.clip(round(levels[k] / (2 / np.pi) * 255), 0, 255)), k)
        frames.append(ReceivedFrame(index=k, pts=k / FPS, image=img, audio=x[k * spf:(k + 1) * spf], speech=True,
                                    segment_end=False))
    offsets_ms = [1000 * o.offset for o in offsets_of_frames(frames, FPS)]
    assert offsets_ms and all(abs(o - 40) < 2 for o in offsets_ms), offsets_ms
