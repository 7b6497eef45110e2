"""The backend contract and the family registry: a family added through the registry alone (no folder, no
edit anywhere else) reaches the CLI, the server config, offline generation, `emo-stream parity` dispatch and
the streaming engine; optional capabilities are read in one place."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
from PIL import Image

from emo_stream.backend import AudioContext, Backend, BackendBase, SegmentJob, capabilities
from emo_stream.registry import (Family, create_backend, family_names, get_family, parity_family, register_family,
                                 unregister_family)
from emo_stream.errors import ConfigError
from emo_stream.timeline import SAMPLE_RATE, samples_per_frame

pytestmark = pytest.mark.timeout(60)
FPS, SIZE = 25, 16
SPF = samples_per_frame(FPS)


class Throwaway(BackendBase):
    """Frames whose first pixel is the frame's audio loudness; nothing else. Only what the contract asks."""

    name = "throwaway"
    clip_frames = 5
    stream_segment_frames = 3

    def __init__(self, size: int, fps: int, gain: float = 1000.0) -> None:
        self.size, self.fps, self.gain = size, fps, gain
        self.audio_context = AudioContext(left_samples=SPF, lookahead_frames=1)
        self.segments: list[int] = []

    def prepare_avatar(self, image):
        return {"mean": float(image.mean())}

    def new_state(self, avatar, seed=0):
        return {"n": 0}

    def encode_audio(self, audio, start, num_frames):
        return audio[start:start + num_frames * SPF].reshape(num_frames, SPF).copy()

    def generate(self, jobs: list[SegmentJob]):
        out = []
        for job in jobs:
            self.segments.append(job.num_frames)
            frames = np.zeros((job.num_frames, self.size, self.size, 3), np.uint8)
            if job.features is not None:
                rms = np.sqrt(np.mean(job.features ** 2, axis=1))
                frames[:, :, :, 0] = np.clip(rms * self.gain, 0, 255).astype(np.uint8)[:, None, None]
            job.state["n"] += job.num_frames
            out.append(frames)
        return out


BUILT: list[Throwaway] = []


def make_throwaway(model=None, *, size, fps, device=None, **options):
    unknown = set(options) - {"gain"}
    if unknown:
        raise ConfigError(f"unknown throwaway options: {', '.join(sorted(unknown))}")
    backend = Throwaway(size, fps, **options)
    BUILT.append(backend)
    return backend


def throwaway_parity(golden_dir, only=None):
    """The throwaway family's golden sets: errors.json holds {case: error}; `only` keeps those groups."""
    errors = json.loads((golden_dir / "errors.json").read_text())
    return {k: v for k, v in errors.items() if only is None or k in only}


THROWAWAY = Family(name="throwaway", title="Throwaway", summary="a test backend", backend=make_throwaway,
                   parity=throwaway_parity, parity_models=("throwaway",))


@pytest.fixture
def throwaway():
    BUILT.clear()
    register_family(THROWAWAY)
    yield "throwaway"
    unregister_family("throwaway")


def tone_wav(path, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    x[: len(x) // 2] = 0   # silence, then a tone: the frames must follow
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return x


def test_builtins_are_registered_and_unknown_names_say_the_choices():
    assert family_names()[:4] == ("preview", "emo", "echomimic", "hallo")
    assert get_family("echomimic").default_fps == 24 and get_family("echomimic").architecture == "echomimic-v1"
    with pytest.raises(ConfigError, match="unknown backend 'nope': choose one of preview, emo"):
        create_backend("nope")


def test_registered_backend_reaches_cli_config_and_generate(throwaway, tmp_path):
    import av

    from server.cli import main
    from server.config import load_config

    assert "throwaway" in family_names()
    assert load_config(None, backend="throwaway").backend == "throwaway"
    with pytest.raises(ConfigError, match="backend must be one of preview, emo, .*throwaway"):
        load_config(None, backend="magic")

    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "face.png")
    audio = tone_wav(tmp_path / "a.wav", 1.0)
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--backend", "throwaway", "--image", str(tmp_path / "face.png"), "--audio",
               str(tmp_path / "a.wav"), "--out", str(out), "--size", str(SIZE), "--no-progress"])
    assert rc == 0
    (backend,) = BUILT
    assert isinstance(backend, Backend)
    assert backend.segments == [5] * 5      # its declared clip_frames cut the offline run
    with av.open(str(out)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == len(audio) // SPF
    # silent half dark, tone half bright (H.264 blurs the values a little)
    assert max(fr[..., 0].mean() for fr in frames[:10]) < 30
    assert min(fr[..., 0].mean() for fr in frames[-10:]) > 150

    assert main(["generate", "--backend", "throwaway", "--image", str(tmp_path / "face.png"), "--audio",
                 str(tmp_path / "a.wav"), "--out", str(out), "--steps", "3"]) == 2   # unknown option: clean error


async def test_registered_backend_streams_through_the_engine(throwaway):
    from emo_stream.streaming import EngineConfig, StreamingEngine

    backend = create_backend("throwaway", size=SIZE, fps=FPS)
    caps = capabilities(backend)
    assert (caps.name, caps.stream_segment_frames, caps.clip_frames, caps.split, caps.concurrent_generate,
            caps.device) == ("throwaway", 3, 5, False, False, None)
    engine = StreamingEngine(backend, EngineConfig(segment_frames=caps.stream_segment_frames, vad=False))
    async with engine:
        session = engine.open_session(await engine.prepare_avatar(np.full((40, 40, 3), 90, np.uint8)))
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE)).astype(np.float32)
        await session.push_audio(tone)
        session.end_of_speech()
        speech = []
        async for frame in session.frames():
            if frame.speech:
                speech.append(frame)
            if frame.segment_end:
                break
        await session.close()
    assert len(speech) == -(-len(tone) // SPF)     # the tail is zero-padded to a whole frame
    np.testing.assert_array_equal(np.concatenate([f.audio for f in speech])[:len(tone)], tone)
    assert all(f.image[0, 0, 0] > 150 for f in speech[1:-1])
    assert set(backend.segments) <= {1, 2, 3}


def test_registered_family_reaches_parity_dispatch(throwaway, tmp_path, capsys):
    from server.cli import main

    assert parity_family("throwaway") is THROWAWAY
    (tmp_path / "case.json").write_text(json.dumps({"model": "throwaway"}))
    (tmp_path / "errors.json").write_text(json.dumps({"loop": 5e-5, "denoiser_single": 0.0}))
    assert main(["parity", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"loop": 5e-5, "denoiser_single": 0.0}
    assert main(["parity", str(tmp_path), "--case", "loop", "--tolerance", "1e-5"]) == 1   # --case reaches it
    out = capsys.readouterr()
    assert json.loads(out.out) == {"loop": 5e-5} and "1 case(s) above 1e-05: loop" in out.err
    unregister_family("throwaway")
    assert main(["parity", str(tmp_path)]) == 2                  # gone with its family
    assert "no parity runner for model 'throwaway'" in capsys.readouterr().err


def test_registry_rejects_bad_registrations(throwaway):
    with pytest.raises(ValueError, match="already registered"):
        register_family(THROWAWAY)
    with pytest.raises(ValueError, match="module:function"):
        Family(name="other", title="Other", backend="emo_stream.nowhere")
    with pytest.raises(ValueError, match="lower-case"):
        Family(name="Bad Name", title="Bad", backend=make_throwaway)
    with pytest.raises(ValueError, match="architecture 'hallo' is already registered by 'hallo'"):
        register_family(Family(name="other", title="Other", backend=make_throwaway, architecture="hallo"))
    with pytest.raises(ValueError, match="parity model 'throwaway' is already replayed by 'throwaway'"):
        register_family(Family(name="other", title="Other", backend=make_throwaway, parity=throwaway_parity,
                               parity_models=("throwaway",)))
    assert "other" not in family_names()


def test_a_family_without_a_backend_loads_but_is_no_backend_choice(tmp_path):
    """A model family whose backend has not landed yet: its folders are recognised, --backend does not offer it."""
    def detect(folder):
        return "Modelonly download" if (folder / "modelonly.bin").is_file() else None

    register_family(Family(name="modelonly", title="Modelonly", detect=detect, load=lambda path, **kw: "loaded",
                           architecture="modelonly-v1"))
    try:
        assert "modelonly" not in family_names()
        (tmp_path / "modelonly.bin").write_bytes(b"")
        from emo_stream.registry import default_backend, family_of, load_model

        assert family_of(tmp_path)[0].name == "modelonly" and load_model(tmp_path) == "loaded"
        assert default_backend(str(tmp_path)) == "modelonly"
        with pytest.raises(ConfigError, match="Modelonly has no backend yet"):
            create_backend(None, str(tmp_path))
    finally:
        unregister_family("modelonly")


def test_register_family_reads_a_package_declaration(tmp_path, monkeypatch):
    """The one registration line of a family folder: register_family("package") reads its FAMILY."""
    pkg = tmp_path / "pluginfam"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from emo_stream.families import Family\n"
        "FAMILY = Family(name='pluginfam', title='Plugin', backend='pluginfam.backend:create')\n")
    (pkg / "backend.py").write_text("def create(**kwargs):\n    return ('built', kwargs['size'], kwargs['fps'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        register_family("pluginfam")
        assert create_backend("pluginfam", size=32) == ("built", 32, 25)
    finally:
        unregister_family("pluginfam")
