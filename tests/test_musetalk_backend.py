"""MuseTalk behind the backend contract: offline generate with a portrait and with a short video avatar (MP4
durations), live segments through the streaming engine, the tensor paste equal to MuseTalk's blending, batching,
idle frames, the avatar disk cache, and pictures that depend on the audio and on the reference.

Weights: ../shared/golden/musetalk's when present, else a generated tiny download (random, published formats).
Random face-parsing weights find no skin, so the fixture makes the parser call every pixel skin: the lower
face is then repainted and the tests can see it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from emo_stream.backend import SegmentJob, capabilities
from emo_stream.families.musetalk import blending as B
from emo_stream.families.musetalk.backend import MuseTalkBackend
from emo_stream.families.musetalk.face_parsing import FaceParser
from emo_stream.families.musetalk.loader import load
from emo_stream.families.musetalk.testing import label_everything_skin, write_download
from emo_stream.media import load_image
from tests.conftest import read_until, shared_golden

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(900)]
SIZE = 128
SPF = 640


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    found = shared_golden("musetalk")
    if found is not None:
        return found / "weights"
    torch.set_num_threads(1)
    return write_download(tmp_path_factory.mktemp("musetalk") / "models", seed=5)


@pytest.fixture(scope="module")
def model(weights):
    torch.set_num_threads(1)
    m = load(weights)
    label_everything_skin(m.parser.net)
    return m


@pytest.fixture(scope="module")
def backend(model, tmp_path_factory):
    return MuseTalkBackend(model, size=SIZE, fps=25, segment_frames=4, clip_frames=6, portrait_motion="still",
                           cache_dir=tmp_path_factory.mktemp("avatar_cache"))


@pytest.fixture(scope="module")
def portrait(portrait_path) -> np.ndarray:
    return load_image(portrait_path)


@pytest.fixture(scope="module")
def avatar(backend, portrait):
    return backend.prepare_avatar(portrait)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced-like test audio: a few harmonics with a syllable envelope and noise, 16 kHz float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 140 + 40 * seed
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def video_file(path: Path, portrait: np.ndarray, frames: int = 6) -> Path:
    """A short 'idle video': the portrait drifting a few pixels, H.264 at 25 fps."""
    from emo_stream.media import Mp4Writer

    with Mp4Writer(path, fps=25, size=(portrait.shape[1] // 2 * 2, portrait.shape[0] // 2 * 2), audio=False) as w:
        base = portrait[: portrait.shape[0] // 2 * 2, : portrait.shape[1] // 2 * 2]
        w.write_frames(np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)]))
    return path


# ---- blending ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tensor_paste_equals_musetalks_realtime_blending(seed):
    """The live path's paste (tensor ops) against get_image_blending's PIL/cv2 computation: exact, for boxes
    and crop squares of any size, also where the square leaves the frame."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = rng.integers(90, 200, 2)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x0, y0 = rng.integers(0, w // 3), rng.integers(0, h // 3)
    box = (int(x0), int(y0), int(min(w, x0 + rng.integers(20, w - x0))), int(min(h, y0 + rng.integers(20, h - y0))))
    crop_box, _ = B.crop_box_for(box, 1.5)
    side = crop_box[2] - crop_box[0]
    mask = cv2.GaussianBlur(rng.integers(0, 256, (side, side), dtype=np.uint8), (5, 5), 0)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    res = cv2.resize(face, (box[2] - box[0], box[3] - box[1]))
    ref = B.realtime_blend(frame, res, box, mask, crop_box)      # BGR in, BGR out (channel order is irrelevant)
    ours = B.paste_one(torch.from_numpy(frame), torch.from_numpy(face), B.plan_from_material(box, mask, crop_box))
    assert np.array_equal(ours.numpy(), ref)


# ---- offline ------------------------------------------------------------------------------------------------
def test_contract(backend):
    caps = capabilities(backend)
    assert caps.split and caps.whole_video and caps.video_avatars and caps.stream_segment_frames == 4
    assert backend.audio_context.lookahead_frames >= backend.model.config.audio_padding_right


def test_generate_with_a_portrait_writes_matching_durations(backend, portrait, tmp_path):
    from emo_stream.generate import generate_file
    from emo_stream.media import probe_durations

    out = tmp_path / "portrait.mp4"
    from emo_stream.generate import frame_count

    audio = speech(0.5)
    summary = generate_file(backend, portrait, audio, out, progress=False)
    info = probe_durations(out)
    assert summary["frames"] == info["frames"] == frame_count(len(audio), 25)
    assert abs(info["video_s"] - info["audio_s"]) <= 1 / 25 + 1e-6


def test_cli_generate_with_a_video_avatar(weights, portrait, tmp_path, monkeypatch):
    """`emo-stream generate --model <MuseTalk folder> --image idle.mp4`: frames of the video play forward then
    backward under the repainted mouth; the MP4's durations match the audio."""
    import wave

    from emo_stream.media import load_video, probe_durations
    from server.cli import main as cli_main

    clip = video_file(tmp_path / "idle.mp4", portrait, frames=4)
    assert load_video(clip, fps=25).shape[0] == 4
    wav = tmp_path / "s.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((speech(0.4) * 32767).astype("<i2").tobytes())
    monkeypatch.setenv("EMO_STREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("emo_stream.families.musetalk.face_parsing.FaceParser", _SkinParser)
    out = tmp_path / "video.mp4"
    rc = cli_main(["generate", "--model", str(weights), "--image", str(clip), "--audio", str(wav), "--out", str(out),
                   "--size", str(SIZE), "--no-progress", "--device", "cpu"])
    assert rc == 0
    info = probe_durations(out)
    assert info["frames"] == 10 and abs(info["video_s"] - info["audio_s"]) <= 1 / 25 + 1e-6
    assert list((tmp_path / "cache" / "musetalk").glob("*.safetensors"))   # prepared once, kept on disk


class _SkinParser:
    """FaceParser whose net calls every pixel skin (for the CLI test, where the backend loads its own model)."""

    def __new__(cls, net, rule=None):
        label_everything_skin(net)
        return FaceParser(net, rule)


def test_video_avatar_cycles_forward_then_backward(backend, portrait):
    frames = np.stack([np.roll(portrait, 3 * i, axis=1) for i in range(3)])
    av = backend.prepare_avatar(frames)
    assert len(av) == 3 and [av.cycle_index(p) for p in range(8)] == [0, 1, 2, 2, 1, 0, 0, 1]
    assert not torch.equal(av.frames[0], av.frames[2])


def test_a_portrait_with_preview_motion_is_a_moving_loop(model, portrait, tmp_path):
    moving = MuseTalkBackend(model, size=SIZE, fps=25, portrait_motion="preview", motion_seconds=0.2,
                             cache_dir=tmp_path)
    av = moving.prepare_avatar(portrait)
    assert len(av) == 5 and len(av.boxes) == 5
    assert any(not torch.equal(av.frames[0], av.frames[k]) for k in range(1, 5))


# ---- what the pictures depend on ------------------------------------------------------------------------------
def _render(backend, avatar, audio, n=4, seed=0):
    feats = backend.encode_audio(np.concatenate([audio, np.zeros(3 * SPF, np.float32)]), 0, n)
    return backend.generate([SegmentJob(avatar=avatar, state=backend.new_state(avatar, seed), features=feats,
                                        num_frames=n)])[0]


def test_pictures_depend_on_audio_only_inside_the_mouth_region(backend, avatar):
    a = _render(backend, avatar, speech(0.3, seed=0))
    b = _render(backend, avatar, speech(0.3, seed=1))
    x0, y0, x1, y1 = avatar.boxes[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0, "the audio changed nothing"
    outside = np.ones(a.shape[1:3], bool)
    outside[y0:y1, x0:x1] = False
    base = avatar.frames[0].cpu().numpy()
    assert np.array_equal(a[:, outside], np.broadcast_to(base[outside], a[:, outside].shape))
    upper = slice(y0, y0 + (y1 - y0) // 4)   # MuseTalk repaints the lower face only
    assert np.array_equal(a[:, upper, x0:x1], np.broadcast_to(base[upper, x0:x1], a[:, upper, x0:x1].shape))


def test_pictures_depend_on_the_reference(backend, avatar, portrait):
    other = backend.prepare_avatar(np.ascontiguousarray(portrait[:, ::-1]))
    audio = speech(0.3)
    a, b = _render(backend, avatar, audio), _render(backend, other, audio)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1


def test_one_batch_for_several_sessions_equals_one_call_each(backend, avatar):
    audio = [speech(0.3, seed=s) for s in (0, 1)]
    singles = [_render(backend, avatar, a) for a in audio]
    jobs = []
    for a in audio:
        feats = backend.encode_audio(np.concatenate([a, np.zeros(3 * SPF, np.float32)]), 0, 4)
        jobs.append(SegmentJob(avatar=avatar, state=backend.new_state(avatar), features=feats, num_frames=4))
    batched = backend.generate(jobs)
    for s, b in zip(singles, batched):
        assert np.abs(s.astype(int) - b.astype(int)).max() <= 1   # batched float math: at most one grey level


def test_select_latents_decodes_a_part_of_a_batch_as_the_whole_batch_did(backend, avatar):
    """What the engine retries a failed decode batch with: each half decodes to that half's frames."""
    jobs = []
    for s, speaking in ((0, True), (1, False), (2, True)):   # an idle job in the middle (rows -1 once cached)
        feats = backend.encode_audio(np.concatenate([speech(0.3, seed=s), np.zeros(3 * SPF, np.float32)]), 0, 3)
        jobs.append(SegmentJob(avatar=avatar, state=backend.new_state(avatar), features=feats if speaking else None,
                               num_frames=3, speech=speaking))
    result = backend.denoise(jobs)
    whole = backend.decode(jobs, result)
    parts = backend.decode(jobs[:1], backend.select_latents(result, [0])) + \
        backend.decode(jobs[1:], backend.select_latents(result, [1, 2]))
    assert len(parts) == 3
    for w, p in zip(whole, parts):
        assert np.abs(w.astype(int) - p.astype(int)).max() <= 1   # batched float math: at most one grey level


def test_idle_frames_are_rendered_once_per_base_frame(backend, avatar, monkeypatch):
    state = backend.new_state(avatar)
    first = backend.generate([SegmentJob(avatar=avatar, state=state, features=None, num_frames=2, speech=False)])[0]
    calls = []
    real = backend.model.denoise
    monkeypatch.setattr(backend.model, "denoise", lambda *a: calls.append(1) or real(*a))
    again = backend.generate([SegmentJob(avatar=avatar, state=backend.new_state(avatar), features=None,
                                         num_frames=2, speech=False)])[0]
    assert not calls and np.array_equal(first, again)


def test_prepared_avatars_come_back_from_the_disk_cache(backend, portrait, monkeypatch):
    first = backend.prepare_avatar(portrait)

    def boom(*a, **k):
        raise AssertionError("prepared again")

    monkeypatch.setattr("emo_stream.families.musetalk.avatar.prepare_frames", boom)
    again = backend.prepare_avatar(portrait)
    assert again.key == first.key and torch.equal(again.frames, first.frames)
    assert torch.equal(again.latents, first.latents) and again.boxes == first.boxes
    assert all(torch.equal(p.mask, q.mask) for p, q in zip(again.plans, first.plans))


# ---- live ------------------------------------------------------------------------------------------------------
def test_a_live_window_holding_the_whole_file_gives_the_offline_prompts(backend):
    """The live path's bookkeeping (window offsets, frame steps, zero padding): a window that holds the whole
    file gives MuseTalk's whole-file prompts at every offset, except the last frames, whose prompts reach past
    the file (zeros offline, encoded silence live)."""
    audio = speech(0.8)
    offline = backend.model.audio_chunks(audio, fps=25)
    window = np.concatenate([audio, np.zeros(3 * SPF, np.float32)])
    live = torch.cat([backend.encode_audio(window, k * SPF, 4) for k in range(0, 20, 4)])
    assert torch.allclose(live[:17], offline[:17], atol=1e-5)
    assert not torch.allclose(live[19], offline[19], atol=1e-3)


def test_streaming_session_through_the_engine(backend, avatar, portrait):
    from emo_stream.streaming import EngineConfig, StreamingEngine

    async def run():
        engine = StreamingEngine(backend, EngineConfig(segment_frames=4, vad=False, energy_threshold_db=-120,
                                                       max_delay_ms=1e9))
        await engine.start()
        handle = await engine.prepare_avatar(portrait)
        sessions = [engine.open_session(handle, seed=s) for s in range(2)]
        for i, s in enumerate(sessions):
            await s.push_audio(speech(0.4, seed=i), sample_rate=16000)
            s.end_of_speech()
        out = [await read_until(s, lambda f: f.segment_end) for s in sessions]
        stats = engine.stats()
        await engine.stop()
        return out, stats

    out, stats = asyncio.run(run())
    for frames in out:
        voiced = [f for f in frames if f.speech]
        assert len(voiced) >= 10 and all(f.image.shape == (SIZE, SIZE, 3) for f in frames)
    assert stats["mean_batch"] is not None


def test_portrait_only_backends_refuse_a_video(portrait):
    from emo_stream.registry import create_backend
    from emo_stream.errors import ImageInputError
    from emo_stream.streaming import StreamingEngine

    engine = StreamingEngine(create_backend("preview", size=SIZE))
    with pytest.raises(ImageInputError, match="portrait"):
        asyncio.run(engine.prepare_avatar(np.stack([portrait, portrait])))
