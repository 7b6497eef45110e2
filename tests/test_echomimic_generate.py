"""The EchoMimic download folder in `generate` and behind the streaming engine, with the real EchoMimic
modules at tiny size: a random download-format folder (emo_stream.families.echomimic.testing, no ../shared
needed) with a tiny random sd-vae-ft-mse/. 128 px (16x16 latents: 4 UNet levels), few steps.

What random weights cannot show: a natural picture, or a boundary that looks smooth (a random model's
frames are unrelated to each other even inside one segment); the boundary-smoothness check with a
temporally coherent model is in test_echomimic_backend.py. Here: the pipeline runs from the folder as it
comes, the held frames are exactly the previous segment's, and the new frames depend on them only through
the model (hold on vs off).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("emo_stream.families.echomimic.importer")

from emo_stream.backend import SegmentJob  # noqa: E402
from emo_stream.families.echomimic.backend import EchoMimicBackend  # noqa: E402
from tests.conftest import read_until  # noqa: E402

SIZE = 128
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def echo_folder(tmp_path_factory) -> Path:
    """A tiny random EchoMimic download folder (acc names), in the published formats, with a tiny VAE."""
    from emo_stream.families.echomimic.testing import write_tiny_echomimic_folder

    d = tmp_path_factory.mktemp("EchoMimic")
    write_tiny_echomimic_folder(d)
    return d


def test_tiny_folder_round_trips_through_the_importer(tmp_path):
    """The writer is the importer's exact inverse: what it wrote is what the importer loads."""
    from emo_stream.families.echomimic.importer import load_download
    from emo_stream.families.echomimic.testing import write_tiny_echomimic_folder

    written = write_tiny_echomimic_folder(tmp_path / "normal", weights_set="normal", vae=False)
    loaded = load_download(tmp_path / "normal")
    assert loaded.config.weights_set == "normal" and loaded.vae is None
    a, b = written.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def backend(echo_folder) -> EchoMimicBackend:
    from emo_stream.registry import create_backend

    torch.set_num_threads(1)
    return create_backend(None, str(echo_folder), size=SIZE, fps=25, device="cpu", steps=2)


def _crop_avatar(backend, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)
    return backend.avatar_from_crop(img, np.array([40, 30, 90, 100], np.float32))


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_model_alone_picks_echomimic_and_says_which_weights(echo_folder, caplog):
    from emo_stream.registry import create_backend, default_backend

    assert default_backend(str(echo_folder)) == "echomimic"
    with caplog.at_level(logging.INFO):
        b = create_backend(None, str(echo_folder), size=SIZE, device="cpu")
    assert isinstance(b, EchoMimicBackend) and b.fps == 24
    assert b.sampling.steps == 6 and b.sampling.guidance == 1.0 and b.sampling.pseudo_velocity
    assert "acc weights" in caplog.text


def test_weights_set_choice(tmp_path, caplog):
    from emo_stream.registry import create_backend
    from emo_stream.errors import WeightsError
    from emo_stream.families.echomimic.testing import write_tiny_echomimic_folder

    write_tiny_echomimic_folder(tmp_path, weights_set="normal")
    with caplog.at_level(logging.INFO):
        b = create_backend(None, str(tmp_path), size=SIZE, device="cpu")
    assert b.model.weights == "normal" and b.sampling.steps == 30 and b.sampling.guidance == 2.5
    assert "normal weights" in caplog.text
    with pytest.raises(WeightsError, match="acc weights asked for"):
        create_backend(None, str(tmp_path), size=SIZE, device="cpu", weights_set="acc")


def test_converted_checkpoint_renders_the_same_video(backend, echo_folder, tmp_path):
    """`emo-stream convert` output runs without the original folder and gives the same frames."""
    from emo_stream.registry import create_backend
    from emo_stream.convert import convert

    ckpt = convert(echo_folder, tmp_path / "ckpt")
    converted = create_backend(None, str(ckpt), size=SIZE, fps=25, device="cpu", steps=1)
    assert isinstance(converted, EchoMimicBackend) and converted.model.weights == "acc"
    original = EchoMimicBackend(backend.model, size=SIZE, fps=25, steps=1)
    audio = _tone(0.3)
    a = np.concatenate([f for f, _ in original.render_video(_crop_avatar(original), audio, seed=4)])
    b = np.concatenate([f for f, _ in converted.render_video(_crop_avatar(converted), audio, seed=4)])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_taesd_decoder_from_the_model_folder(tmp_path):
    from diffusers import AutoencoderTiny

    from emo_stream.registry import create_backend
    from emo_stream.errors import ConfigError
    from emo_stream.families.echomimic.testing import write_tiny_echomimic_folder

    write_tiny_echomimic_folder(tmp_path)
    with pytest.raises(ConfigError, match="taesd"):
        create_backend(None, str(tmp_path), size=SIZE, device="cpu", decoder="taesd")
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(tmp_path / "taesd")
    b = create_backend(None, str(tmp_path), size=SIZE, fps=25, device="cpu", decoder="taesd", steps=1)
    frames = np.concatenate([f for f, _ in b.render_video(_crop_avatar(b), _tone(0.2), seed=0)])
    assert frames.shape == (5, SIZE, SIZE, 3)


def test_cli_generate_from_the_download_folder(echo_folder, portrait_path, tmp_path):
    """`emo-stream generate --model FOLDER`: face detection, 24 fps, duration and A/V sync of the MP4."""
    import wave

    from emo_stream.media import probe_durations
    from server.cli import main

    wav = tmp_path / "a.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((_tone(1.0) * 32767).astype("<i2").tobytes())
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--model", str(echo_folder), "--image", str(portrait_path), "--audio", str(wav),
               "--out", str(out), "--size", str(SIZE), "--steps", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    d = probe_durations(out)
    assert d["fps"] == 24 and d["frames"] == 24
    assert abs(d["audio_s"] - d["video_s"]) < 0.05


def test_offline_render_is_deterministic_and_long_videos_use_windows(backend):
    one_step = EchoMimicBackend(backend.model, size=SIZE, fps=25, steps=1)
    avatar = _crop_avatar(one_step)
    audio = _tone(0.6)  # 15 frames: two overlapping 12-frame windows
    a = np.concatenate([f for f, _ in one_step.render_video(avatar, audio, seed=1)])
    b = np.concatenate([f for f, _ in one_step.render_video(avatar, audio, seed=1)])
    c = np.concatenate([f for f, _ in one_step.render_video(avatar, audio, seed=2)])
    assert a.shape == (15, SIZE, SIZE, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_held_frames_are_the_previous_segment_and_reach_the_new_frames(backend):
    """Segment 2 = 4 held + 8 new frames in one window; the held ones come out as segment 1 left them, and
    the new ones depend on them (only the temporal layers mix frames, so this is the path that continues
    the previous segment)."""
    import copy

    import emo_stream.families.echomimic.backend as eb

    b = EchoMimicBackend(backend.model, size=SIZE, fps=25, steps=2, live_overlap=4)
    avatar = _crop_avatar(b)
    audio = _tone(2.0)
    state = b.new_state(avatar, seed=3)
    b.generate([SegmentJob(avatar, state, b.encode_audio(audio, 0, 8), 8)])
    feats = b.encode_audio(audio, 8 * 640, 8)
    moved = copy.copy(state)
    moved.generator = torch.Generator().set_state(state.generator.get_state())
    moved.tail_latents = state.tail_latents + 0.5   # as if segment 1 had ended elsewhere
    runs, real = [], eb.sample
    eb.sample = lambda *args, **kw: runs.append(real(*args, **kw)) or runs[-1]
    try:
        tail = state.tail_latents.clone()
        b.generate([SegmentJob(avatar, state, feats, 8)])
        b.generate([SegmentJob(avatar, moved, feats, 8)])
    finally:
        eb.sample = real
    assert runs[0].shape[2] == 12
    assert torch.equal(runs[0][:, :, :4], tail)
    assert (runs[1][:, :, 4:] - runs[0][:, :, 4:]).abs().max() > 1e-3


def test_engine_streams_echomimic_segments(backend):
    from emo_stream.streaming import EngineConfig, StreamingEngine

    class Faceless:
        def __init__(self, inner):
            self.inner = inner
            for name in ("name", "fps", "size", "audio_context", "new_state", "encode_audio", "denoise", "decode",
                         "generate", "stream_segment_frames"):
                setattr(self, name, getattr(inner, name))

        def prepare_avatar(self, image):
            return _crop_avatar(self.inner)

    async def run():
        engine = StreamingEngine(Faceless(backend), EngineConfig(segment_frames=8, vad=False, energy_threshold_db=-120,
                                                                 max_delay_ms=1e9))
        await engine.start()
        avatar = await engine.prepare_avatar(np.zeros((SIZE, SIZE, 3), np.uint8))
        session = engine.open_session(avatar)
        audio = _tone(0.7)
        await session.push_audio(audio, sample_rate=16000)
        session.end_of_speech()
        frames = await read_until(session, lambda f: f.segment_end)
        await engine.stop()
        return frames

    frames = asyncio.run(run())
    speech = [f for f in frames if f.speech]
    assert len(speech) >= 16 and all(f.image.shape == (SIZE, SIZE, 3) for f in frames)


def test_serve_settings_choose_steps_guidance_and_weights_of_the_live_model(echo_folder):
    """serve/worker take the same sampling settings as generate (config keys or --steps/--guidance/--weights)."""
    from emo_stream.errors import ConfigError, WeightsError
    from server.app import build_engine
    from server.config import load_config
    from server.sync import MonotonicClock

    config = load_config(None, model=str(echo_folder), size=SIZE, device="cpu", steps=3, guidance=1.5,
                         weights="acc")
    engine = build_engine(config, MonotonicClock())
    assert engine.backend.sampling.steps == 3 and engine.backend.sampling.guidance == 1.5
    assert engine.backend.model.weights == "acc"
    with pytest.raises(WeightsError, match="normal weights asked for"):   # the folder holds acc only
        build_engine(load_config(None, model=str(echo_folder), size=SIZE, device="cpu", weights="normal"),
                     MonotonicClock())
    for bad, message in (({"model": str(echo_folder), "steps": 0}, "steps must be at least 1"),
                         ({"model": str(echo_folder), "guidance": -1.0}, "guidance must be"),
                         ({"weights": "acc"}, "--weights applies to EchoMimic models, not the preview backend")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, **bad)
