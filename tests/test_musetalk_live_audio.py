"""MuseTalk's live audio path on its 30 s grid: audio fed in 20 / 40 ms chunks, cut into live segments as the
streaming engine cuts it (AudioWindow with the backend's audio context), gives every frame MuseTalk's own
whole-file prompt of the session's audio as received when the frame was cut; across the 30 s boundary too, and
once the utterance is closed, the whole-file prompts of the complete audio. Batched calls (several sessions'
segments in one whisper call) equal one call each.

Weights: a tiny random whisper (d_model 32) for the long streams, and ../shared/golden/musetalk's whisper (the
set's, random, real width) when present. Tolerance: 1e-5; measured on this CPU: 0 (the same float ops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emo_stream.families.musetalk import audio as A
from emo_stream.families.musetalk.loader import build_extractor, build_whisper_encoder, load_strict, read_json, \
    read_state, whisper_encoder_state
from emo_stream.families.musetalk.testing import TINY_WHISPER
from emo_stream.streaming.window import AudioWindow
from tests.conftest import shared_golden

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(600)]
FPS, SPF, TOL = 25, 640, 1e-5
BOUNDARY_FRAME = A.SEGMENT_SAMPLES // SPF   # 750: the first frame of the second 30 s segment


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = dict(TINY_WHISPER, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_attention_heads=2,
               decoder_ffn_dim=64)
    return build_whisper_encoder(cfg).eval(), build_extractor({"feature_size": 80})


@pytest.fixture(scope="module")
def golden():
    found = shared_golden("musetalk")
    if found is None:
        pytest.skip("../shared/golden/musetalk is not present")
    folder = found / "weights" / "whisper"
    enc = build_whisper_encoder(read_json(folder / "config.json"))
    weights = folder / "pytorch_model.bin"
    load_strict(enc, whisper_encoder_state(read_state(weights), weights), weights, "a whisper encoder")
    return enc.eval(), build_extractor(read_json(folder / "preprocessor_config.json"))


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced-like audio with a syllable envelope and a louder second half (so the future changes the log-mel
    floor, as in real speech), a whole number of frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FPS) * SPF) / 16000
    x = sum(np.sin(2 * np.pi * (130 + 30 * seed) * k * t) / k for k in range(1, 6))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t)) * np.where(t > seconds / 2, 1.0, 0.3)
    return (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def stream(audio: np.ndarray, chunk: int, segment: int, extra: int = 0) -> list[tuple]:
    """(cut, samples received when it was cut) for every live segment, the audio fed `chunk` samples at a time
    and the utterance closed at the end (then the rest is cut)."""
    window = AudioWindow(SPF, A.live_context(FPS, 2, 2, extra))
    cuts, t = [], 0.0
    for i in range(0, len(audio), chunk):
        t += 1
        window.append(audio[i:i + chunk], t)
        while window.frames_ready() >= segment:
            cuts.append((window.cut(segment), window.end))
    window.close_utterance(t + 1)
    while window.frames_ready():
        cuts.append((window.cut(segment), len(audio)))
    return cuts


def file_prompts(whisper, audio: np.ndarray, received: int) -> torch.Tensor:
    """MuseTalk's whole-file prompts (get_audio_feature + get_whisper_chunk) of the audio received so far."""
    enc, ext = whisper
    return A.file_chunks(enc, ext, audio[:received], FPS)


def live_prompts(whisper, cuts: list[tuple]) -> list[torch.Tensor]:
    """What MuseTalkBackend.encode_audio_batch returns for these cuts: one batched whisper call."""
    enc, ext = whisper
    with torch.no_grad():
        return A.encode_requests(enc, ext, [(c.window, c.start, c.num_frames) for c, _ in cuts], FPS)


def check_equal_to_the_file_received(whisper, audio, cuts):
    for (cut, received), live in zip(cuts, live_prompts(whisper, cuts)):
        ref = file_prompts(whisper, audio, received)[cut.first_frame:cut.first_frame + cut.num_frames]
        if received == len(audio):   # closed: the last 3 prompts reach past the file (zeros there, silence live)
            keep = max(0, len(audio) // SPF - 2 - cut.first_frame)
            live, ref = live[:keep], ref[:keep]
        assert live.shape == ref.shape
        err = (live - ref).abs().max().item() if len(ref) else 0.0
        assert err <= TOL, f"frames {cut.first_frame}+{cut.num_frames} received {received}: max error {err}"


@pytest.mark.parametrize("chunk_ms,segment,extra", [(20, 5, 0), (40, 8, 3)])
def test_live_prompts_are_musetalks_whole_file_prompts_of_the_audio_received(tiny, chunk_ms, segment, extra):
    audio = speech(31.0)
    cuts = stream(audio, chunk_ms * 16, segment, extra)
    frames = [c.first_frame for c, _ in cuts]
    assert frames == list(range(0, len(audio) // SPF, segment))
    # the windows start on the 30 s grid and hold no more than one segment of history
    for cut, received in cuts:
        lo = cut.first_frame * SPF - cut.start
        assert lo % A.SEGMENT_SAMPLES == 0 and cut.start < A.SEGMENT_SAMPLES + 2 * SPF
        if received < len(audio):
            assert received == (cut.first_frame + cut.num_frames + 2 + extra) * SPF
    # checked: the first cut, one inside the first segment, those whose prompts cross 30 s, the last two
    cross = [i for i, f in enumerate(frames) if BOUNDARY_FRAME - segment - 3 <= f <= BOUNDARY_FRAME + 2]
    picked = [cuts[i] for i in sorted({0, len(cuts) // 3, *cross, len(cuts) - 2, len(cuts) - 1})]
    assert any(c.first_frame * SPF - c.start == A.SEGMENT_SAMPLES for c, _ in picked)   # a window on the 30 s line
    assert any(c.first_frame < BOUNDARY_FRAME < c.first_frame + c.num_frames + 2 for c, _ in picked)
    check_equal_to_the_file_received(tiny, audio, picked)


def test_the_audio_not_yet_received_is_what_differs(tiny):
    """Not vacuous: a frame cut early in its 30 s segment differs from the complete file's prompt (the rest of
    the segment is still zeros there), and the same frames encoded once the whole segment has arrived are the
    complete file's."""
    audio = speech(12.0)
    cut, _ = stream(audio, 320, 5)[10]          # frames 50-54, cut with 2 frames of audio past them
    f = cut.first_frame
    full = file_prompts(tiny, audio, len(audio))[f:f + 5]
    assert (live_prompts(tiny, [(cut, 0)])[0] - full).abs().max().item() > 100 * TOL
    window = np.concatenate([audio, np.zeros(2 * SPF, np.float32)])   # the whole segment received
    with torch.no_grad():
        assert (A.stream_chunks(*tiny, window, f * SPF, 5, FPS) - full).abs().max().item() <= TOL


def test_a_batched_call_equals_one_call_per_session(tiny):
    """Sessions at different places (one across the 30 s boundary) in one whisper call."""
    streams = [stream(speech(31.0, seed=s), 640, 5) for s in (0, 1)]
    reqs = [streams[0][3], streams[1][BOUNDARY_FRAME // 5], streams[1][-1]]
    batched = live_prompts(tiny, reqs)
    for r, b in zip(reqs, batched):
        single = live_prompts(tiny, [r])[0]
        assert torch.allclose(single, b, atol=TOL, rtol=0)


def test_on_the_golden_whisper_across_the_30s_boundary(golden):
    """The set's whisper (MuseTalk's layout, real width, random weights): the two cuts whose prompts cross the
    30 s boundary of a stream fed in 40 ms chunks."""
    audio = speech(30.4, seed=2)
    cuts = stream(audio, 640, 5)
    frames = [c.first_frame for c, _ in cuts]
    picked = [cuts[frames.index(BOUNDARY_FRAME - 5)], cuts[frames.index(BOUNDARY_FRAME)]]
    check_equal_to_the_file_received(golden, audio, picked)
