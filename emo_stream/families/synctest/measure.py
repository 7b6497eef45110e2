"""Reading the synctest pattern back: how far the flashes are from the sound they were drawn from.

Input from any path (WebSocket frames, a browser's displayed frames and played audio, a LiveKit room):

    frames    (time each frame starts being shown, its flash level 0..1), in display order
    envelope  (time, mean |x|) of the audio as it is heard, in short blocks (1-3 ms)

All times in one clock and unit (seconds). A frame shows the mean |x| of the frame_s seconds of audio it
carries, so if video trails audio by `offset`, the frame shown at t carries the envelope of [t - offset,
t - offset + frame_s). For each burst of sound the offset is the value in a +-search window that best
explains the shown levels (correlation of the levels with that prediction; the burst's edges fall inside
frames, so the fit resolves a fraction of a frame). > 0: the picture comes after the sound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BurstOffset:
    onset: float        # the burst's first loud audio block (envelope clock)
    offset: float       # flash minus sound, seconds (> 0: picture late)
    score: float        # correlation of the shown levels with the prediction at that offset (1 = exact)
    frames: int         # frames used


def bursts(times: np.ndarray, env: np.ndarray, threshold: float, quiet_s: float = 0.3) -> list[float]:
    """Onset times of bursts: a block over `threshold` after at least quiet_s with none."""
    times, env = np.asarray(times, float), np.asarray(env, float)
    loud = times[env > threshold]
    out: list[float] = []
    last = -np.inf
    for t in loud:
        if t - last >= quiet_s:
            out.append(float(t))
        last = t
    return out


def _window_means(times: np.ndarray, env: np.ndarray, starts: np.ndarray, width: float) -> np.ndarray:
    """Mean envelope over [s, s + width) for each start (blocks treated as constant over their spacing)."""
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else 1e-3
    # a block stands for its own spacing only: across a gap (frames lost on the way) the sound is unknown, not
    # the last block's level held
    dt = np.minimum(np.diff(times, append=times[-1] + spacing), spacing)
    cum = np.concatenate([[0.0], np.cumsum(env * dt)])
    edges = np.concatenate([times, [times[-1] + dt[-1]]])
    integral = np.interp(starts + width, edges, cum) - np.interp(starts, edges, cum)
    return integral / width


def burst_offsets(frame_times, frame_levels, env_times, env, frame_s: float, *, threshold: float | None = None,
                  search_s: float = 0.25, step_s: float = 0.0005, before_s: float = 0.3,
                  after_s: float = 0.6) -> list[BurstOffset]:
    """One offset per burst of sound (see the module doc). `threshold`: envelope level that starts a burst
    (default a quarter of the loudest block)."""
    ft, fl = np.asarray(frame_times, float), np.asarray(frame_levels, float)
    et, ev = np.asarray(env_times, float), np.asarray(env, float)
    if len(ft) < 3 or len(et) < 3 or ev.max() <= 0:
        return []
    thr = threshold if threshold is not None else 0.25 * float(ev.max())
    grid = np.arange(-search_s, search_s + step_s / 2, step_s)
    out = []
    for onset in bursts(et, ev, thr):
        sel = (ft >= onset - before_s) & (ft <= onset + after_s)
        if sel.sum() < 4:
            continue
        shown = fl[sel]
        if shown.std() == 0:
            continue
        # predicted level of each shown frame for each candidate offset: (len(grid), frames)
        pred = _window_means(et, ev, (ft[sel][None, :] - grid[:, None]).ravel(), frame_s).reshape(len(grid), -1)
        pc = pred - pred.mean(axis=1, keepdims=True)
        sc = shown - shown.mean()
        denom = np.sqrt((pc ** 2).sum(axis=1) * (sc ** 2).sum())
        corr = np.where(denom > 0, (pc @ sc) / np.where(denom > 0, denom, 1), -1.0)
        best = int(np.argmax(corr))
        ties = np.flatnonzero(corr >= corr[best] - 1e-9)   # a flat top: its middle
        best = int(ties[len(ties) // 2])
        out.append(BurstOffset(onset=onset, offset=float(grid[best]), score=float(corr[best]),
                               frames=int(sel.sum())))
    return out


def summary_ms(offsets: list[BurstOffset], min_score: float = 0.8) -> dict:
    """Median / min / max of the well-fitted bursts' offsets in ms, and how many fitted."""
    good = [o.offset * 1000 for o in offsets if o.score >= min_score]
    if not good:
        return {"bursts": len(offsets), "fitted": 0}
    return {"bursts": len(offsets), "fitted": len(good), "median_ms": round(float(np.median(good)), 1),
            "min_ms": round(min(good), 1), "max_ms": round(max(good), 1),
            "in_order_ms": [round(x, 1) for x in good]}


def frame_envelope(frame_audio: list[np.ndarray], frame_starts: list[float], rate: int = 16000,
                   block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(times, mean |x|) blocks of audio delivered frame by frame (WebSocket frames carry their samples)."""
    times, env = [], []
    for audio, t0 in zip(frame_audio, frame_starts):
        x = np.abs(np.asarray(audio, np.float32))
        n = len(x) // block
        if n:
            env.append(x[:n * block].reshape(n, block).mean(axis=1))
            times.append(t0 + np.arange(n) * block / rate)
    if not times:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(times), np.concatenate(env)


def beeps(seconds: float, *, rate: int = 16000, every_s: float = 1.0, first_s: float = 0.3137, beep_s: float = 0.2,
          hz: float = 1000.0, amplitude: float = 0.5) -> np.ndarray:
    """A test signal: `beep_s` tones every `every_s`, the first at `first_s` (not on a frame boundary, and each
    later one lands elsewhere in its frame: the fit must resolve fractions of a frame)."""
    x = np.zeros(int(seconds * rate), np.float32)
    t = np.arange(int(beep_s * rate)) / rate
    ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.001)   # 1 ms edges: sharp, no click
    tone = (amplitude * np.sin(2 * np.pi * hz * t) * ramp).astype(np.float32)
    k = 0
    while True:
        s = int(rate * (first_s + k * (every_s + 0.0071)))
        if s + len(tone) > len(x):
            return x
        x[s:s + len(tone)] = tone
        k += 1


def offsets_of_frames(frames, fps: int, rate: int = 16000) -> list[BurstOffset]:
    """Offsets of frames received with their audio (the WebSocket API's frames: .pts, .image, .audio), on the
    session's own clock: frame k starts at its pts, its audio right there."""
    from emo_stream.families.synctest.backend import read_pattern

    frames = sorted(frames, key=lambda f: f.pts)
    patterns = [read_pattern(f.image) for f in frames]
    # a frame whose counter repeats the previous one was not drawn from its audio (the engine held the last
    # picture: fall-behind policy, or a clear): the sound it carries says nothing about its picture
    drawn = [k for k, (_, c) in enumerate(patterns) if k == 0 or c != patterns[k - 1][1]]
    times = [float(frames[k].pts) for k in drawn]
    levels = [patterns[k][0] for k in drawn]
    et, ev = frame_envelope([f.audio for f in frames], [float(f.pts) for f in frames], rate)
    return burst_offsets(times, levels, et, ev, 1.0 / fps)
