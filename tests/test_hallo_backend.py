"""The Hallo backend on golden-format weights (../shared/golden/hallo, else a generated set; + a random tiny VAE): offline clips chained through
motion frames, live segments continuing each other, Hallo2's motion-frame masking, and the registry."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from emo_stream.backend import SegmentJob, capabilities
from emo_stream.errors import ConfigError
from tests.conftest import read_until

SIZE = 128


@pytest.fixture(scope="module")
def backend(hallo_set):
    from diffusers import AutoencoderKL

    from emo_stream.families.hallo.backend import HalloBackend
    from emo_stream.families.hallo import parity as hparity

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = hparity.build_model(hallo_set, hparity.read_case(hallo_set))
    model.vae = AutoencoderKL(block_out_channels=[32] * 4, layers_per_block=1, norm_num_groups=32,
                              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                              latent_channels=4, sample_size=SIZE).eval()
    return HalloBackend(model, size=SIZE, fps=25, steps=2)


def _avatar(backend):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pts = np.concatenate([rng.uniform([30, 40], [98, 110], (48, 2)), rng.uniform([52, 86], [76, 98], (20, 2))])
    return backend.avatar_from_crop(image, pts, rng.standard_normal(512).astype(np.float32))


def _audio(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_offline_covers_the_audio_and_is_deterministic(backend):
    avatar = _avatar(backend)
    audio = _audio(0.4)                        # 10 frames at 25 fps -> 2 clips of 8, trimmed to 10
    chunks = list(backend.render_video(avatar, audio, seed=42))
    frames = np.concatenate([f for f, _ in chunks])
    assert frames.shape == (10, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert sum(len(a) for _, a in chunks) == 10 * 640
    again, _ = next(iter(backend.render_video(avatar, audio, seed=42)))
    assert np.array_equal(frames[:8], again)


def test_clips_chain_through_the_last_two_decoded_frames(backend, monkeypatch):
    avatar = _avatar(backend)
    state = backend.new_state(avatar, seed=1)
    seen = []
    real = backend.model.encode_images
    monkeypatch.setattr(backend.model, "encode_images", lambda px: seen.append(px.clone()) or real(px))
    wins = backend.encode_audio(_audio(1.0), 0, 8)
    first = backend.generate([SegmentJob(avatar=avatar, state=state, features=wins, num_frames=8)])[0]
    # first clip: reference + the reference repeated as motion frames
    assert torch.equal(seen[0][1], seen[0][0]) and torch.equal(seen[0][2], seen[0][0])
    backend.generate([SegmentJob(avatar=avatar, state=state, features=wins, num_frames=8)])
    # second clip: the first clip's last two frames (float pixels in [-1, 1]) follow the reference
    assert torch.equal(seen[1][0], seen[0][0])
    prev = torch.from_numpy(first[-2:]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    assert float((seen[1][1:] - prev).abs().max()) < 2.5 / 255      # uint8 output vs the float frames kept
    assert state.frames_done == 16


def test_live_segment_shorter_than_the_motion_frames(backend):
    avatar = _avatar(backend)
    state = backend.new_state(avatar, seed=3)
    backend.generate([SegmentJob(avatar=avatar, state=state, features=None, num_frames=4, speech=False)])
    keep = state.motion_pixels.clone()
    out = backend.generate([SegmentJob(avatar=avatar, state=state, features=None, num_frames=1, speech=False)])[0]
    assert out.shape == (1, SIZE, SIZE, 3)
    assert torch.equal(state.motion_pixels[0], keep[1])   # queue of the newest two frames


def test_hallo2_masks_motion_pixels_outside_the_face(backend, monkeypatch):
    avatar = _avatar(backend)
    state = backend.new_state(avatar, seed=5)
    state.motion_pixels = torch.ones(2, 3, SIZE, SIZE)
    seen = []
    real = backend.model.encode_images
    monkeypatch.setattr(backend.model, "encode_images", lambda px: seen.append(px.clone()) or real(px))
    monkeypatch.setattr(backend.model.config, "variant", "hallo2")
    backend.generate([SegmentJob(avatar=avatar, state=state, features=None, num_frames=2, speech=False)])
    motion = seen[0][1]
    inside = avatar.face_mask.bool()
    assert bool((motion[:, inside] == 1).all())
    dropped = float((motion[0][~inside] == 0).float().mean())
    assert 0.15 < dropped < 0.35


def test_capabilities_and_bad_options(backend):
    caps = capabilities(backend)
    assert caps.whole_video and caps.clip_frames == 8 and caps.name == "hallo"
    from emo_stream.families.hallo.backend import HalloBackend
    with pytest.raises(ConfigError, match="VAE only"):
        HalloBackend(backend.model, size=SIZE, decoder="taesd")
    with pytest.raises(ConfigError, match="multiple of 64"):
        HalloBackend(backend.model, size=100)


def test_registry_routes_hallo_folders(tmp_path):
    from emo_stream import registry
    (tmp_path / "hallo").mkdir()
    (tmp_path / "hallo" / "net.pth").write_bytes(b"")
    assert registry.default_backend(str(tmp_path)) == "hallo"
    assert "hallo" in registry.family_names()
    with pytest.raises(ConfigError, match="needs --model"):
        registry.create_backend("hallo", None)


@pytest.mark.slow   # ~30 s on one core
def test_generate_cli_on_a_download_shaped_folder(tmp_path, portrait_path, capsys, hallo_set):
    """`emo-stream generate --model pretrained_models` end to end: detection, loading as downloaded, the
    backend chosen from the folder, an MP4 covering the audio."""
    from diffusers import AutoencoderKL

    from emo_stream.media import probe_durations
    from emo_stream.families.hallo import parity as hparity
    from server.cli import main as cli_main
    from test_hallo import make_download

    from emo_stream.media import load_audio
    from tests.golden_sets import write_wav

    root = make_download(tmp_path / "pretrained_models", hparity.read_case(hallo_set), variant="hallo2",
                         golden=hallo_set)
    AutoencoderKL(block_out_channels=[32] * 4, layers_per_block=1, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  latent_channels=4, sample_size=SIZE).save_pretrained(root / "sd-vae-ft-mse")
    wav = tmp_path / "speech.wav"          # 1.3 s, as the shared set's audio.wav
    write_wav(wav, 1.3, seed=0)
    assert abs(len(load_audio(wav)) / 16000 - 1.3) < 1e-3
    out = tmp_path / "out.mp4"
    rc = cli_main(["generate", "--model", str(root), "--image", str(portrait_path), "--audio",
                   str(wav), "--out", str(out), "--size", str(SIZE), "--steps", "1",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    info = probe_durations(out)
    assert abs(info["frames"] - 33) <= 1 and abs(info["audio_s"] - 1.3) < 0.05, info   # 1.3 s at 25 fps


class _FaceFree:
    """The Hallo backend with a detection-free avatar (fixed landmarks), for the engine."""

    def __init__(self, backend):
        self.inner = backend
        for name in ("name", "fps", "size", "audio_context", "new_state", "encode_audio", "generate",
                     "stream_segment_frames", "clip_frames"):
            setattr(self, name, getattr(backend, name))

    def prepare_avatar(self, image):
        return _avatar(self.inner)


@pytest.mark.timeout(300)
async def test_live_segments_through_the_streaming_engine(backend):
    """`serve` path: the engine windows streamed audio, the backend renders segments that continue each
    other through motion frames (frames numbered without gaps, the right size)."""
    from emo_stream.streaming import EngineConfig, StreamingEngine

    engine = StreamingEngine(_FaceFree(backend), EngineConfig(segment_frames=8, vad=False,
                                                              energy_threshold_db=-120, max_delay_ms=1e9))
    await engine.start()
    avatar = await engine.prepare_avatar(np.zeros((SIZE, SIZE, 3), np.uint8))
    session = engine.open_session(avatar)
    audio = _audio(0.64) + np.random.default_rng(0).standard_normal(10240).astype(np.float32) * 1e-4
    await session.push_audio(audio, sample_rate=16000)
    session.end_of_speech()
    frames = await read_until(session, lambda f: f.segment_end)
    await engine.stop()
    assert [f.index for f in frames] == list(range(len(frames)))
    assert len([f for f in frames if f.speech]) >= 16
    assert all(f.image.shape == (SIZE, SIZE, 3) for f in frames)
