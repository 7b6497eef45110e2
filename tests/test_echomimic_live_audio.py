"""EchoMimic's live audio tokens on whisper's 30 s grid: audio fed in 20 / 40 ms chunks, cut into live segments as
the streaming engine cuts it (AudioWindow with the backend's audio context), gives every frame EchoMimic's own
whole-file tokens (log-mel of the whole clip floored at its max - 8, 30 s segments padded in the log-mel domain,
feature2chunks) of the session's audio up to the end of the frame's window: across the 30 s line, up to a minute,
and after the utterance is closed (the engine's zero padding is then part of that audio). Past a minute the
log-mel floor is the window's (the last 30-60 s): shown below to differ where it matters, and only there.

Weights: a tiny random whisper (width 32, 2 layers) for the long streams, and ../shared/golden/echomimic-v1's
whisper (the set's, random, real width 384) when present. Tolerance 1e-5; measured on this CPU: 0 against our
whole-file pass (the same float ops in the same order: one segment per encoder call on both sides) and 1.7e-6
against the features EchoMimic's own code stored in that set (max abs 4.3; our whole-file pass is 1.7e-6 off too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo_stream.blocks.whisper_grid import SEGMENT_SAMPLES
from emo_stream.families.echomimic import audio as A
from emo_stream.streaming.window import AudioWindow
from tests.conftest import shared_golden

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(600)]
FPS, SPF, TOL = 25, 640, 1e-5
BOUNDARY_FRAME = SEGMENT_SAMPLES // SPF   # 750: the first frame of the second 30 s segment


def tiny_whisper(seed: int = 0) -> A.WhisperFeatures:
    torch.manual_seed(seed)
    w = A.WhisperFeatures({"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 32, "n_audio_head": 2,
                           "n_audio_layer": 2})
    with torch.no_grad():   # random biases and norms too: nothing cancels out by construction
        for p in w.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return w.eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_whisper()


@pytest.fixture(scope="module")
def golden():
    found = shared_golden("echomimic-v1")
    if found is None:
        pytest.skip("../shared/golden/echomimic-v1 is not present")
    from emo_stream.families.echomimic.importer import read_whisper

    dims, state = read_whisper(found / "weights" / "whisper_tiny.pt")
    w = A.WhisperFeatures(dims)
    w.encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return w.eval()


def speech(seconds: float, seed: int = 0, gaps: bool = False) -> np.ndarray:
    """Voiced-like audio with a syllable envelope and a louder second half (so the future moves the log-mel
    floor), a whole number of frames; gaps: 0.2 s of digital silence every 2 s (log-mel at the floor there)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FPS) * SPF) / 16000
    x = sum(np.sin(2 * np.pi * (130 + 30 * seed) * k * t) / k for k in range(1, 6))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t)) * np.where(t > seconds / 2, 1.0, 0.3)
    x = 0.2 * x + 0.01 * rng.standard_normal(len(t))
    if gaps:
        x[(t % 2.0) > 1.8] = 0.0
    return x.astype(np.float32)


def stream(audio: np.ndarray, chunk: int, segment: int, extra: int = 0) -> list[tuple]:
    """(cut, absolute sample of its window's first) for every live segment, the audio fed `chunk` samples at a
    time and the utterance closed at the end (then the rest is cut)."""
    window = AudioWindow(SPF, A.live_context(FPS, extra))
    cuts, t = [], 0.0
    for i in range(0, len(audio), chunk):
        t += 1
        window.append(audio[i:i + chunk], t)
        while window.frames_ready() >= segment:
            cut = window.cut(segment)
            cuts.append((cut, cut.first_frame * SPF - cut.start))
    window.close_utterance(t + 1)
    while window.frames_ready():
        cut = window.cut(segment)
        cuts.append((cut, cut.first_frame * SPF - cut.start))
    return cuts


def whole_file_tokens(whisper, audio: np.ndarray, end: int, first: int, n: int) -> torch.Tensor:
    """EchoMimic's whole-file tokens (audio2feat + feature2chunks) of frames first .. first + n - 1 of the audio
    up to sample `end` (zeros past the audio: the engine's padding of a closed utterance)."""
    x = np.concatenate([audio, np.zeros(max(0, end - len(audio)), np.float32)])[:end]
    return A.audio_tokens(whisper.features(x), FPS, first + n)[first:first + n]


def live_tokens(whisper, cuts: list[tuple]) -> list[torch.Tensor]:
    """What EchoMimicBackend.encode_audio_batch returns for these cuts: one batched whisper call."""
    return A.encode_live(whisper.segment_states, [(c.window, c.start, c.num_frames) for c, _ in cuts], FPS)


def max_error(whisper, audio, cut, lo, live) -> float:
    end = lo + len(cut.window)
    ref = whole_file_tokens(whisper, audio, end, cut.first_frame, cut.num_frames)
    assert live.shape == ref.shape
    return (live - ref).abs().max().item()


def check_equal_to_the_file_received(whisper, audio, cuts):
    for (cut, lo), live in zip(cuts, [live_tokens(whisper, [c])[0] for c in cuts]):
        err = max_error(whisper, audio, cut, lo, live)
        assert err <= TOL, f"frames {cut.first_frame}+{cut.num_frames} (window from {lo}): max error {err}"


@pytest.mark.parametrize("chunk_ms,segment,extra", [(20, 8, 0), (40, 5, 2)])
def test_live_tokens_are_echomimics_whole_file_tokens_of_the_audio_received(tiny, chunk_ms, segment, extra):
    audio = speech(31.0)
    cuts = stream(audio, chunk_ms * 16, segment, extra)
    frames = [c.first_frame for c, _ in cuts]
    assert frames == list(range(0, len(audio) // SPF, segment))
    lookahead = A.live_context(FPS, extra).lookahead_frames
    assert lookahead == 3 + extra   # a frame's last row ends 120 ms after its first sample
    for cut, lo in cuts:
        # the window starts on the 30 s line before the segment's own: the stream's start in the first minute
        assert lo == 0 and len(cut.window) == (cut.first_frame + cut.num_frames + lookahead) * SPF
    # checked: the first cut, one inside the first segment, those whose rows cross 30 s, the last two (closed)
    cross = [i for i, f in enumerate(frames) if BOUNDARY_FRAME - segment - 3 <= f <= BOUNDARY_FRAME + 3]
    picked = [cuts[i] for i in sorted({0, len(cuts) // 3, *cross, len(cuts) - 2, len(cuts) - 1})]
    # rows int(50 t) - 4 ... + 5 in both 30 s segments (1500 rows each)
    assert any(c.first_frame * 2 - 4 < 1500 <= (c.first_frame + c.num_frames - 1) * 2 + 5 for c, _ in picked)
    check_equal_to_the_file_received(tiny, audio, picked)


def test_a_batched_call_equals_one_call_per_session(tiny):
    """Sessions at different places (one with rows in both 30 s segments) in one whisper call."""
    streams = [stream(speech(31.0, seed=s), 640, 8) for s in (0, 1)]
    reqs = [streams[0][3], streams[1][BOUNDARY_FRAME // 8], streams[1][-1]]
    batched = live_tokens(tiny, reqs)
    for r, b in zip(reqs, batched):
        assert torch.allclose(live_tokens(tiny, [r])[0], b, atol=TOL, rtol=0)


def test_past_a_minute_the_floor_is_the_windows():
    """After 60 s the window starts at 30 s. With digital silence in the audio (log-mel at the floor there), a
    loud moment before the window (at 5 s) sets the whole file's floor but not the live one: the tokens differ.
    The same audio with the loud moment inside the window (at 40 s) gives the whole file's tokens exactly."""
    whisper = tiny_whisper(1)
    errors = {}
    for burst_at in (5.0, 40.0):
        audio = speech(63.0, seed=2, gaps=True)
        i = int(burst_at * 16000)
        audio[i:i + 8000] = 0.9 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
        cuts = stream(audio, 640, 8)
        cut, lo = next((c, lo) for c, lo in cuts if c.first_frame >= 62 * FPS)
        assert lo == SEGMENT_SAMPLES
        errors[burst_at] = max_error(whisper, audio, cut, lo, live_tokens(whisper, [(cut, lo)])[0])
        if burst_at == 40.0:
            # frames from 60.0 s: their first rows lie before the 60 s line, so the window still starts at 0 (one
            # starting at 30 s reflect-pads the STFT frames at 30 s: 1.5e-3 off on tiny.en weights)
            at60 = [(c, lo) for c, lo in stream(audio, 640, 4) if c.first_frame == 60 * FPS]
            assert len(at60) == 1 and at60[0][1] == 0
            errors["60 s"] = max_error(whisper, audio, *at60[0], live_tokens(whisper, at60)[0])
    assert errors[40.0] <= TOL and errors["60 s"] <= TOL, errors
    assert errors[5.0] > 100 * TOL, errors


def test_a_window_off_the_grid_is_not_the_whole_file(tiny):
    """Must fail: the same frames encoded from a window that starts 2 s before them (the earlier live path's
    left context) sit at other positions of whisper's 30 s input and see another floor."""
    audio = speech(12.0)
    cut, lo = stream(audio, 320, 8)[30]                # frames 240-247, cut once their look-ahead arrived
    assert lo == 0
    off = 2 * 16000
    shifted = (cut.window[cut.start - off:], off, cut.num_frames)
    live = A.encode_live(tiny.segment_states, [shifted], FPS)[0]
    assert max_error(tiny, audio, cut, lo, live) > 1000 * TOL
    assert max_error(tiny, audio, cut, lo, live_tokens(tiny, [(cut, lo)])[0]) <= TOL


def test_live_tokens_equal_the_features_echomimics_code_stored(golden):
    """Against EchoMimic's own output, not ours: the set's audio.safetensors holds what EchoMimic's vendored
    whisper computed (audio2feat) for its 1 s clip. Live windows ending where the clip ends (the engine's cuts of
    that clip fed in 20 ms chunks, and one window of the whole clip for every frame) give exactly those features at
    feature2chunks' rows int(i x 50 / fps) - 4 + j, clipped to the clip's rows. A perturbed clip must not."""
    from safetensors.torch import load_file

    from emo_stream.families.echomimic.parity import _read_wav

    root = shared_golden("echomimic-v1")
    wav = _read_wav(root / "audio.wav").numpy()
    ref = load_file(str(root / "audio.safetensors"))["whisper_features"]      # (50, L + 1, 384), EchoMimic's
    assert len(wav) == 16000 and ref.shape[0] == 50
    n = len(wav) // SPF                                                       # 25 frames at 25 fps

    def reference(first: int, count: int) -> torch.Tensor:
        rows = np.clip(np.arange(first, first + count)[:, None] * 50 // FPS - 4 + np.arange(10)[None], 0, 49)
        return ref[torch.from_numpy(rows)].reshape(count, -1, ref.shape[-1])

    whole = A.encode_live(golden.segment_states, [(wav, 0, n)], FPS)[0]
    assert (whole - reference(0, n)).abs().max().item() <= TOL
    # the cut the engine makes once the clip's last sample arrived: its window is exactly the clip
    ends = [(c, lo) for c, lo in stream(wav, 320, 2) if lo == 0 and len(c.window) == len(wav)]
    assert len(ends) == 1
    cut = ends[0][0]
    live = live_tokens(golden, ends)[0]
    assert (live - reference(cut.first_frame, cut.num_frames)).abs().max().item() <= TOL
    bent = wav.copy()
    bent[8000] += 0.05
    moved = A.encode_live(golden.segment_states, [(bent, 0, n)], FPS)[0]
    assert (moved - reference(0, n)).abs().max().item() > 10 * TOL


def test_on_the_golden_whisper_across_the_30s_boundary(golden):
    """The set's whisper (EchoMimic's layout, real width, random weights): the cuts whose rows cross the 30 s
    line of a stream fed in 40 ms chunks; a perturbed weight must not pass."""
    audio = speech(30.6, seed=3)
    cuts = stream(audio, 640, 8)
    picked = [(c, lo) for c, lo in cuts if c.first_frame in (744, 752)]   # rows in both segments; in the second
    assert len(picked) == 2
    check_equal_to_the_file_received(golden, audio, picked)
    bent = A.WhisperFeatures(golden.dims).eval()
    bent.load_state_dict(golden.state_dict())
    with torch.no_grad():
        bent.encoder.layers[0].fc1.weight[0, 0] += 1e-3
    cut, lo = picked[0]
    assert max_error(golden, audio, cut, lo, live_tokens(bent, [picked[0]])[0]) > 10 * TOL
