"""EchoMimicBackend: offline render (EchoMimic's pipeline over the whole audio) and live segments that
continue each other through held frames. Model: `FakeEcho` (a few lines of tensor arithmetic with a live
temporal mixing term) here; the real EchoMimic modules at tiny size where the model package provides them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo_stream.backend import Backend, SegmentJob, capabilities
from emo_stream.families.echomimic.audio import tokens_at
from emo_stream.families.echomimic.backend import EchoMimicBackend, echomimic_face_mask
from emo_stream.families.echomimic.sampling import make_scheduler
from emo_stream.face import FaceInfo
from emo_stream.generate import generate_file
from emo_stream.media import probe_durations

SIZE = 64


class StubFaces:
    """One face in the middle of any photo (no dlib)."""

    def analyze(self, image):
        h, w = image.shape[:2]
        return FaceInfo(box=np.array([w * .3, h * .25, w * .7, h * .7], np.float32),
                        landmarks=np.zeros((68, 2), np.float32))

    def landmarks(self, image, box):
        return np.zeros((68, 2), np.float32)


class FakeEcho:
    """EchoParts in plain arithmetic: x0 guess = reference + audio energy + a pull towards the frames' mean
    (the 'temporal layer'), turned into a v-prediction. Counts ReferenceNet and denoiser calls."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, weights: str = "acc", mixing: float = 0.8):
        self.weights, self.mixing = weights, mixing
        self.alphas = make_scheduler().alphas_cumprod
        self.reference_calls = 0
        self.denoiser_rows: list[int] = []

    def encode_image(self, images):
        small = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([small, small.mean(1, keepdim=True)], 1) * 0.18215 * 5

    def decode_latents(self, latents, decoder="vae"):
        return torch.tanh(torch.nn.functional.interpolate(latents[:, :3] / 0.9, scale_factor=8))

    def has_decoder(self, decoder):
        return decoder == "vae"

    def reference_bank(self, ref_latents):
        self.reference_calls += 1
        return ref_latents

    def face_feature(self, mask):
        return torch.nn.functional.avg_pool3d(mask, (1, 8, 8))

    def whisper_features(self, waveform):
        rows = max(1, len(waveform) // 320)
        energy = np.sqrt(np.mean(np.resize(waveform[:rows * 320], (rows, 320)) ** 2, axis=1))
        return torch.from_numpy(energy.astype(np.float32))[:, None, None].expand(rows, 2, 384).contiguous()

    whisper_mels = 80

    def whisper_segments(self, mel):
        """(n, 80, 3000) log-mel -> (n, 1500, 2, 384): each step's loudness, about whisper_features' RMS (the
        live path's encoder)."""
        power = 10 ** (4 * mel - 4)      # undoes (log10 + 4) / 4
        level = power.reshape(mel.shape[0], mel.shape[1], -1, 2).mean((1, 3)).sqrt() / 2
        return level[:, :, None, None].expand(*level.shape, 2, 384).contiguous()

    def denoiser(self, banks):
        bank = torch.cat(banks)

        def call(latents, t, audio, face, with_reference):
            self.denoiser_rows.append(latents.shape[0])
            a = self.alphas[int(t)]
            a_t, b_t = a.sqrt(), (1 - a).sqrt()
            ref = bank[torch.arange(latents.shape[0]) % bank.shape[0]] * with_reference[:, None, None, None]
            x0 = ref[:, :, None] + audio.mean((2, 3))[:, None, :, None, None] * 4 + face
            # the "temporal layer": each frame pulled towards its neighbours' current estimate
            near = a_t * latents
            near = (torch.cat([near[:, :, :1], near[:, :, :-1]], 2) + torch.cat([near[:, :, 1:], near[:, :, -1:]], 2)) / 2
            x0 = (1 - self.mixing) * x0 + self.mixing * near
            return (a_t * latents - x0) / b_t
        return call


def _image(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, (xx + yy) / 2], -1) * 200 + rng.integers(0, 40, (size, size, 3))
    return base.clip(0, 255).astype(np.uint8)


def _speech(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 3 * t) * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture
def backend() -> EchoMimicBackend:
    return EchoMimicBackend(FakeEcho(), size=SIZE, fps=25, face_analyzer=StubFaces())


def test_contract_and_capabilities(backend):
    assert isinstance(backend, Backend)
    caps = capabilities(backend)
    assert caps.split and caps.whole_video and caps.stream_segment_frames == 8
    assert backend.sampling.steps == 6 and backend.sampling.guidance == 1.0
    normal = EchoMimicBackend(FakeEcho("normal"), size=SIZE)
    assert normal.sampling.steps == 30 and normal.sampling.guidance == 2.5


def test_portrait_crop_and_mask_follow_echomimic(backend):
    """The face box is half the crop's width, centred; the mask is that box padded by 10%."""
    avatar = backend.prepare_avatar(_image(size=200))
    x0, y0, x1, y1 = avatar.face_box
    assert abs((x1 - x0) / SIZE - 0.5) < 0.02 and abs((x0 + x1) / 2 - SIZE / 2) < 1.5
    assert abs((y0 + y1) / 2 - SIZE / 2) < 1.5


def test_face_mask_is_the_box_padded_by_ten_percent():
    mask = echomimic_face_mask(np.array([40, 30, 90, 100]), 128)[0, 0, 0]
    ys, xs = np.nonzero(mask.numpy())
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (30 - 7, 100 + 7, 40 - 5, 90 + 5)


def test_live_tokens_pick_the_rows_echomimic_picks_offline():
    """Live windows start mid-stream: tokens by time equal EchoMimic's offline feature2chunks of the same frames."""
    from emo_stream.families.echomimic.audio import audio_tokens

    feats = torch.randn(50, 2, 384)
    offline = audio_tokens(feats, 24, 26)
    assert torch.equal(tokens_at(feats, np.arange(26) / 24), offline)
    assert torch.equal(tokens_at(feats, np.array([10 / 24, 11 / 24])), offline[10:12])


def test_render_video_any_length_and_sync(backend, tmp_path):
    audio = _speech(1.3)
    summary = generate_file(backend, _image(), audio, tmp_path / "out.mp4", progress=False)
    assert summary["frames"] == round(1.3 * 25)
    d = probe_durations(tmp_path / "out.mp4")
    assert d["frames"] == summary["frames"] and abs(d["video_s"] - 1.3) < 0.05
    assert abs(d["audio_s"] - d["video_s"]) < 0.05
    # 33 frames > 12: several overlapping windows per step, one ReferenceNet run
    assert backend.model.reference_calls == 1
    assert len(backend.model.denoiser_rows) == 6 * 4


def test_render_video_at_24_fps_is_deterministic(tmp_path):
    b = EchoMimicBackend(FakeEcho(), size=SIZE, fps=24, face_analyzer=StubFaces())
    avatar = b.prepare_avatar(_image())
    audio = _speech(1.0)
    chunks = list(b.render_video(avatar, audio, seed=3))
    frames = np.concatenate([f for f, _ in chunks])
    assert frames.shape == (24, SIZE, SIZE, 3)
    assert sum(len(a) for _, a in chunks) == 16000
    again = np.concatenate([f for f, _ in b.render_video(avatar, audio, seed=3)])
    assert np.array_equal(frames, again)


def _live(backend, avatar, state, audio, first, n):
    spf = 16000 // backend.fps
    left = backend.audio_context.left_samples
    lo = max(0, first * spf - left)
    window = audio[lo:(first + n + backend.audio_context.lookahead_frames) * spf]
    feats = backend.encode_audio(window, first * spf - lo, n)
    return backend.generate([SegmentJob(avatar=avatar, state=state, features=feats, num_frames=n)])[0]


def test_live_segments_hold_the_previous_tail():
    b = EchoMimicBackend(FakeEcho(), size=SIZE, fps=25, face_analyzer=StubFaces())
    avatar = b.prepare_avatar(_image())
    state = b.new_state(avatar, seed=1)
    audio = _speech(3.0)
    _live(b, avatar, state, audio, 0, 8)
    tail = state.tail_latents.clone()
    jobs = [SegmentJob(avatar=avatar, state=state, features=b.encode_audio(audio, 8 * 640, 8), num_frames=8)]
    seen = {}
    import emo_stream.families.echomimic.backend as eb

    real = eb.sample

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["out"] = out
        return out
    eb.sample = spy
    try:
        b.generate(jobs)
    finally:
        eb.sample = real
    # the held frames come out exactly as the previous segment left them; 4 + 8 frames in one window
    assert seen["out"].shape[2] == 12
    assert torch.equal(seen["out"][:, :, :4], tail)


def test_live_boundary_is_no_hard_cut():
    """Frame difference across a segment boundary, with the held-frame scheme vs without it (same seeds):
    the scheme makes the first new frame continue the last shown one."""
    audio = _speech(3.0)
    jumps = {}
    for overlap in (4, 0):
        b = EchoMimicBackend(FakeEcho(), size=SIZE, fps=25, face_analyzer=StubFaces(), live_overlap=overlap)
        avatar = b.prepare_avatar(_image())
        state = b.new_state(avatar, seed=5)
        a = _live(b, avatar, state, audio, 0, 8).astype(np.float32)
        c = _live(b, avatar, state, audio, 8, 8).astype(np.float32)
        inside = np.mean([np.abs(c[i + 1] - c[i]).mean() for i in range(7)])
        jumps[overlap] = np.abs(c[0] - a[-1]).mean() / max(inside, 1e-6)
    assert jumps[4] < 0.5 * jumps[0], jumps


def test_batched_sessions_match_single_runs(backend):
    avatar = backend.prepare_avatar(_image())
    audio = _speech(2.0)
    singles = []
    for seed in (1, 2):
        s = backend.new_state(avatar, seed)
        _live(backend, avatar, s, audio, 0, 8)
        singles.append(_live(backend, avatar, s, audio, 8, 8))
    states = [backend.new_state(avatar, seed) for seed in (1, 2)]
    feats0, feats1 = backend.encode_audio(audio, 0, 8), backend.encode_audio(audio, 8 * 640, 8)
    backend.generate([SegmentJob(avatar, s, feats0, 8) for s in states])
    both = backend.generate([SegmentJob(avatar, s, feats1, 8) for s in states])
    for x, y in zip(both, singles):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_idle_segments_need_no_features_and_cost_less(backend):
    avatar = backend.prepare_avatar(_image())
    state = backend.new_state(avatar, 0)
    backend.model.denoiser_rows.clear()
    frames = backend.generate([SegmentJob(avatar, state, None, 6, speech=False)])[0]
    assert frames.shape == (6, SIZE, SIZE, 3)
    assert len(backend.model.denoiser_rows) == backend.idle_steps == 3   # acc: 6 steps for speech
