"""Ingest and windowing: chunking never changes the audio, and streamed segment windows are the
windows the offline generator cuts from the whole file."""

from __future__ import annotations

import numpy as np
import pytest

from emo_stream.backend import AudioContext
from emo_stream.errors import AudioInputError
from emo_stream.streaming.ingest import AudioInbox, EndOfSpeech, PcmConverter
from emo_stream.streaming.window import AudioWindow

SPF = 640


def chunks(x: np.ndarray, rng, low=1, high=4000):
    i = 0
    while i < len(x):
        n = int(rng.integers(low, high))
        yield x[i:i + n]
        i += n


@pytest.mark.parametrize("rate,channels,dtype", [(48000, 2, np.int16), (44100, 1, np.float32),
                                                 (16000, 2, np.int16), (8000, 1, np.float32)])
def test_converter_is_chunking_invariant(rate, channels, dtype):
    rng = np.random.default_rng(rate)
    x = (rng.standard_normal(rate * channels) * 0.2).astype(np.float32)
    if dtype == np.int16:
        x = (x * 32767).astype(np.int16)
    whole = PcmConverter()
    ref = np.concatenate([whole.convert(x, rate, channels), whole.flush()])
    assert abs(len(ref) - 16000) <= 1
    conv = PcmConverter()
    got = np.concatenate([conv.convert(c, rate, channels) for c in chunks(x, rng)] + [conv.flush()])
    np.testing.assert_array_equal(got, ref)


def test_converter_accepts_pcm16_bytes_and_rejects_bad_input():
    x = (np.arange(1000) % 200 - 100).astype("<i2")
    conv = PcmConverter()
    out = np.concatenate([conv.convert(x.tobytes()[:998], 16000), conv.convert(x.tobytes()[998:], 16000)])
    np.testing.assert_array_equal(out, x.astype(np.float32) / 32768)
    with pytest.raises(AudioInputError):
        conv.convert(b"\x00\x01\x02", 16000)
    with pytest.raises(AudioInputError):
        conv.convert(x, 16000, channels=0)
    with pytest.raises(AudioInputError):
        conv.convert(x, 44100.5)
    with pytest.raises(AudioInputError):
        conv.convert(x.astype(np.int64), 16000)


def test_inbox_is_bounded_and_keeps_marks_in_order():
    box = AudioInbox(1000)
    box.put(np.ones(600, np.float32), 1.0)
    assert box.space() == 400
    box.put(np.ones(400, np.float32), 2.0)
    box.put_end(EndOfSpeech(3.0))
    assert box.space() == 0
    first = box.take(700)
    assert sum(len(i[0]) for i in first) == 700 and box.queued == 300
    rest = box.take(10_000)
    assert len(rest[0][0]) == 300 and isinstance(rest[-1], EndOfSpeech)
    assert box.queued == 0 and not box.pending()


def offline_windows(audio: np.ndarray, context: AudioContext, clip: int):
    """The cutting of emo_stream.generate.iter_segments, for one whole utterance."""
    total = -(-len(audio) // SPF)
    la = context.lookahead_frames * SPF
    padded = np.concatenate([audio, np.zeros(total * SPF - len(audio) + la, np.float32)])
    out = []
    for first in range(0, total, clip):
        n = min(clip, total - first)
        start = first * SPF
        lo = max(0, start - context.left_samples)
        lo -= lo % context.align_samples if context.align_samples else 0   # on the backend's grid
        out.append((padded[lo:start + n * SPF + la], start - lo, n))
    return out


@pytest.mark.parametrize("left,lookahead,clip,align", [(0, 0, 3, 0), (3200, 2, 8, 0), (16000, 2, 12, 0),
                                                       (1000, 1, 1, 0), (1280, 2, 5, 8000), (640, 3, 4, 6400)])
def test_streamed_windows_equal_offline_windows(left, lookahead, clip, align):
    rng = np.random.default_rng(left + clip)
    context = AudioContext(left_samples=left, lookahead_frames=lookahead, align_samples=align)
    audio = rng.standard_normal(int(16000 * 1.93)).astype(np.float32)
    window = AudioWindow(SPF, context)
    cuts = []
    t = 0.0
    for c in chunks(audio, rng, 1, 2000):
        t += 1
        window.append(c, t)
        if window.frames_ready():
            assert (window.frames_ready() + lookahead) * SPF <= window.buffered_samples()
        while window.frames_ready() >= clip:
            cuts.append(window.cut(clip))
            assert window.buffered_samples() < (clip + lookahead + 1) * SPF + 2000
    window.close_utterance(t + 1)
    while window.frames_ready():
        cuts.append(window.cut(clip))
    expected = offline_windows(audio, context, clip)
    assert len(cuts) == len(expected)
    for cut, (w, start, n) in zip(cuts, expected):
        np.testing.assert_array_equal(cut.window, w)
        assert (cut.start, cut.num_frames) == (start, n)
    assert cuts[-1].end_of_speech and not any(c.end_of_speech for c in cuts[:-1])
    # completion times never decrease and a frame is complete only once its look-ahead arrived
    complete = np.concatenate([c.complete for c in cuts])
    assert np.all(np.diff(complete) >= 0) and complete[-1] == t + 1


def test_lookahead_after_end_of_speech_is_silence():
    """The next utterance's audio never leaks into the previous one's look-ahead."""
    context = AudioContext(left_samples=0, lookahead_frames=2)
    window = AudioWindow(SPF, context)
    window.append(np.ones(1000, np.float32), 0.0)
    window.close_utterance(1.0)
    window.append(np.full(5000, 7.0, np.float32), 2.0)
    cut = window.cut(8)
    assert cut.num_frames == 2 and cut.end_of_speech
    assert np.all(cut.window[:1000] == 1) and not cut.window[1000:].any()
    nxt = window.cut(8)
    assert nxt.first_frame == 2 and nxt.num_frames == 5000 // SPF - 2


def test_reset_drops_uncut_audio():
    window = AudioWindow(SPF, AudioContext(left_samples=640, lookahead_frames=2))
    window.append(np.ones(5000, np.float32), 0.0)
    window.cut(3)
    window.reset()
    assert window.buffered_samples() == 0 and window.frames_ready() == 0
    window.append(np.ones(640 * 3, np.float32), 1.0)
    assert window.cut(1).first_frame == 3


def test_an_aligned_window_starts_on_the_grid_and_keeps_its_history_across_a_reset():
    """MuseTalk's whisper grid: every window starts on a multiple of align_samples of the session's audio
    (counted over everything pushed), an interrupt included, and no more history than that is kept."""
    align = 8 * SPF
    window = AudioWindow(SPF, AudioContext(left_samples=2 * SPF, lookahead_frames=2, align_samples=align))
    x = np.arange(40 * SPF, dtype=np.float32)
    window.append(x[:13 * SPF], 0.0)
    cuts = [window.cut(3) for _ in range(3)]        # frames 0-8
    window.reset()                                   # drops frames 9-12, not yet cut
    window.append(x[20 * SPF:40 * SPF], 1.0)         # the next utterance continues at frame 9
    cuts += [window.cut(3) for _ in range(5)]        # frames 9-23
    for c in cuts:
        first = c.first_frame * SPF
        lo = first - c.start
        assert lo % align == 0 and lo <= first - 2 * SPF or lo == 0
        assert first - lo < align + 2 * SPF
    after = cuts[3]
    assert after.first_frame == 9 and after.start == 9 * SPF   # back to the grid line at 0: history kept
    np.testing.assert_array_equal(after.window[:after.start], x[:9 * SPF])
    np.testing.assert_array_equal(after.audio, x[20 * SPF:23 * SPF])
    assert window._base % align == 0 and window.end - window._base < align + 2 * SPF + 20 * SPF
