"""Windowing: the session's pushed audio cut into segments of whole frames for the audio encoder.

Frame f of the audio covers samples [f * spf, (f + 1) * spf) (spf = 640 at 25 fps). A segment of n
frames is handed to the encoder with the backend's left context before it and its look-ahead after it,
exactly as the offline generator (emo_stream.generate.iter_segments) cuts the whole file, so a frame's
features only depend on where segment boundaries fall, not on how the audio arrived. After an
end-of-speech the audio is zero-padded to a whole frame and the look-ahead past it is zeros. Sample
positions count every sample pushed since the session opened (an interrupt drops only what was not cut
yet), so a backend on a grid of the session's audio (AudioContext.align_samples) stays on it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from emo_stream.backend import AudioContext


@dataclass
class Cut:
    """One segment ready for the encoder."""

    first_frame: int          # audio frame number (counted over all pushed audio) of the first frame
    window: np.ndarray        # left context + segment + look-ahead (zero-padded at the end of speech)
    start: int                # window[start] is the segment's first sample
    num_frames: int
    audio: np.ndarray         # the segment's own samples, num_frames * spf
    complete: np.ndarray      # per frame: when its samples and its look-ahead had all arrived (clock seconds)
    end_of_speech: bool       # the segment ends an utterance (explicitly closed)


class AudioWindow:
    """Pushed 16 kHz audio not yet cut, plus the left context the encoder needs. Bounded by its user:
    audio is appended only while fewer than segment + look-ahead frames are waiting."""

    def __init__(self, samples_per_frame: int, context: AudioContext) -> None:
        self.spf = samples_per_frame
        self.context = context
        self.lookahead = int(context.lookahead_frames) * samples_per_frame
        self._data = np.zeros(0, np.float32)   # _data[:_len] holds samples _base ... end - 1; room to grow
        self._len = 0
        self._base = 0          # absolute sample index of _data[0]
        self.pos = 0            # absolute sample index of the next frame to cut (a frame boundary)
        self._arrival_end: list[int] = []    # absolute end sample of each appended chunk ...
        self._arrival_time: list[float] = []  # ... and when it arrived
        self._flushes: list[tuple[int, float, bool]] = []  # (end sample, time, explicit) of closed utterances

    @property
    def _buf(self) -> np.ndarray:
        return self._data[:self._len]

    @property
    def end(self) -> int:
        """Absolute sample index one past the last sample received."""
        return self._base + self._len

    def buffered_samples(self) -> int:
        return self.end - self.pos

    def append(self, samples: np.ndarray, arrival: float) -> None:
        if len(samples):
            need = self._len + len(samples)
            if need > len(self._data):   # grow geometrically: appending 20 ms chunks to a long history stays cheap
                data = np.empty(max(need, 2 * len(self._data)), np.float32)
                data[:self._len] = self._data[:self._len]
                self._data = data
            self._data[self._len:need] = samples
            self._len = need
            self._arrival_end.append(self.end)
            self._arrival_time.append(arrival)

    def close_utterance(self, time: float, explicit: bool = True) -> bool:
        """End of speech: pad to a whole frame; the look-ahead past this point is zeros.
        Returns False when no audio is waiting to be cut (the utterance already went out whole)."""
        if self.end == self.pos:
            return False
        pad = (-self.end) % self.spf
        if pad:
            self.append(np.zeros(pad, np.float32), time)
        self._flushes.append((self.end, time, explicit))
        return True

    def pending_flush(self) -> bool:
        return bool(self._flushes)

    def frames_ready(self) -> int:
        """Whole frames that can be cut now: their look-ahead has arrived, or their utterance is closed."""
        if self._flushes:
            return (self._flushes[0][0] - self.pos) // self.spf
        return max(0, (self.end - self.lookahead - self.pos) // self.spf)

    def cut(self, num_frames: int) -> Cut:
        spf = self.spf
        n = min(num_frames, self.frames_ready())
        if n <= 0:
            raise ValueError("no whole frame is ready to cut")
        start_abs = self.pos
        seg_end = start_abs + n * spf
        limit = self._flushes[0][0] if self._flushes else self.end   # audio past this is not ours
        lo = max(self._base, self.context.window_start(start_abs))
        hi = min(seg_end + self.lookahead, limit)
        window = self._buf[lo - self._base:hi - self._base]
        missing = seg_end + self.lookahead - hi
        if missing:
            window = np.concatenate([window, np.zeros(missing, np.float32)])
        # when did each frame's samples and look-ahead arrive?
        closes = self._flushes[0] if self._flushes else None
        complete = np.empty(n, np.float64)
        for i in range(n):
            need = min(start_abs + (i + 1) * spf + self.lookahead, limit) - 1
            t = self._arrival_time[bisect.bisect_right(self._arrival_end, need)]
            if closes is not None and start_abs + (i + 1) * spf + self.lookahead > limit:
                t = max(t, closes[1])
            complete[i] = t
        eos = bool(closes and closes[2] and seg_end == closes[0])
        cut = Cut(first_frame=start_abs // spf, window=window.copy(), start=start_abs - lo, num_frames=n,
                  audio=self._buf[start_abs - self._base:seg_end - self._base].copy(),
                  complete=complete, end_of_speech=eos)
        self.pos = seg_end
        if closes is not None and seg_end >= closes[0]:
            self._flushes.pop(0)
        self._trim()
        return cut

    def _trim(self) -> None:
        keep_from = max(self._base, self.context.window_start(self.pos))
        if keep_from > self._base:
            drop = keep_from - self._base
            self._data[:self._len - drop] = self._data[drop:self._len]
            self._len -= drop
            self._base = keep_from
        # arrival records ending before what we keep are no longer needed (keep one for lookups)
        k = bisect.bisect_left(self._arrival_end, self.pos)
        if k > 0:
            del self._arrival_end[:k]
            del self._arrival_time[:k]

    def reset(self) -> None:
        """Interrupt: drop everything not yet cut; the next audio starts a fresh utterance on a frame. The
        history already cut stays (the left context of what comes next, as in the offline file)."""
        self._len = self.pos - self._base
        self._arrival_end.clear()
        self._arrival_time.clear()
        self._flushes.clear()
