"""Per-session streaming statistics: latency percentiles, frame rate, drops and late frames."""

from __future__ import annotations

from collections import deque

import numpy as np


class SessionStats:
    """Counters updated by the engine's threads under the session lock; snapshot() is cheap."""

    def __init__(self, fps: int, window: int = 1000) -> None:
        self.fps = fps
        self.latencies_ms: deque[float] = deque(maxlen=window)   # speech frames: ready - audio complete
        self.segment_latencies_ms: deque[float] = deque(maxlen=window)  # per segment: compute + queueing only
        self._ready_times: deque[float] = deque(maxlen=4 * fps)  # recent frames, for the frame rate
        self.frames = 0
        self.speech_frames = 0
        self.idle_frames = 0
        self.voiced_frames = 0
        self.dropped_frames = 0    # held by the fall-behind policy instead of generated
        self.late_frames = 0       # ready later than late_ms after their due time
        self.discarded_frames = 0  # generated or queued, then dropped by clear()
        self.dropped_input_s = 0.0  # audio dropped by clear()

    def record(self, ready: float, speech: bool, voiced: bool, dropped: bool, late: bool,
               latency_s: float | None) -> None:
        self.frames += 1
        self._ready_times.append(ready)
        if speech:
            self.speech_frames += 1
        else:
            self.idle_frames += 1
        self.voiced_frames += voiced
        self.dropped_frames += dropped
        self.late_frames += late
        if latency_s is not None:
            self.latencies_ms.append(latency_s * 1000.0)

    def record_segment(self, latency_s: float) -> None:
        """A speech segment's frames are ready: time since its last frame's audio (+ look-ahead) arrived."""
        self.segment_latencies_ms.append(latency_s * 1000.0)

    def fps_now(self) -> float:
        t = self._ready_times
        if len(t) < 2 or t[-1] <= t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def snapshot(self) -> dict:
        def pct(values, q):
            return round(float(np.percentile(np.asarray(values, np.float64), q)), 1) if len(values) else None

        return {
            "latency_ms": {"p50": pct(self.latencies_ms, 50), "p95": pct(self.latencies_ms, 95)},
            "segment_latency_ms": {"p50": pct(self.segment_latencies_ms, 50),
                                   "p95": pct(self.segment_latencies_ms, 95)},
            "fps": round(self.fps_now(), 2),
            "frames": self.frames,
            "speech_frames": self.speech_frames,
            "idle_frames": self.idle_frames,
            "voiced_frames": self.voiced_frames,
            "dropped_frames": self.dropped_frames,
            "late_frames": self.late_frames,
            "discarded_frames": self.discarded_frames,
            "dropped_input_s": round(self.dropped_input_s, 3),
        }
