"""Blinks, idle head motion and speech-correlated nods, deterministic from the session seed.

Everything is a function of the absolute frame index and of random draws made per *event* (one draw
per blink), never per segment, so the same seed gives the same motion however the stream is cut
into segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# eyelid closure over the frames of one blink at 25 fps (~240 ms: fast close, slower open)
BLINK_PROFILE_25 = np.array([0.45, 0.9, 1.0, 0.75, 0.45, 0.18], np.float32)


@dataclass(frozen=True)
class MotionConfig:
    blink_min_s: float = 1.4        # shortest gap between blinks
    blink_mean_extra_s: float = 2.4  # mean of the gamma-distributed extra gap (people: ~15 blinks/min)
    double_blink_p: float = 0.12
    sway_x: float = 0.010           # idle head translation amplitude, fraction of face width
    sway_y: float = 0.006
    sway_roll: float = 0.018        # radians (~1 degree)
    sway_yaw: float = 0.012         # apparent turn: nose shift against the face outline, face widths
    speech_boost: float = 0.8       # head motion grows by this factor while speaking
    nod_gain: float = 0.030         # nod depth for a strong accent, fraction of face width


@dataclass
class MotionState:
    rng: np.random.Generator
    frame: int = 0
    next_blink: int = 0             # frame at which the next blink starts
    blink_pos: int = -1             # index into the blink profile, -1 when not blinking
    activity: float = 0.0           # smoothed speech activity 0..1
    jaw_slow: float = 0.0
    nod: float = 0.0                # nod spring position and velocity
    nod_vel: float = 0.0
    sway_freq: np.ndarray = field(default_factory=lambda: np.zeros((4, 3), np.float32))
    sway_phase: np.ndarray = field(default_factory=lambda: np.zeros((4, 3), np.float32))


@dataclass
class MotionFrame:
    blink: np.ndarray   # (n,) eyelid closure 0..1
    head: np.ndarray    # (n, 5): tx, ty (face widths), roll (rad), nod, yaw (face widths)


@dataclass
class MotionModel:
    fps: int = 25
    config: MotionConfig = field(default_factory=MotionConfig)

    def __post_init__(self) -> None:
        # resample the 25 fps blink profile to this frame rate
        t = np.arange(int(round(len(BLINK_PROFILE_25) * self.fps / 25))) * 25 / self.fps
        self._blink = np.interp(t, np.arange(len(BLINK_PROFILE_25)), BLINK_PROFILE_25).astype(np.float32)

    def new_state(self, seed: int) -> MotionState:
        rng = np.random.default_rng(int(seed) % 2**64)  # any int seeds (numpy rejects negative ones)
        st = MotionState(rng=rng)
        # three incommensurate slow sinusoids per axis (tx, ty, roll, yaw): smooth, never visibly periodic
        st.sway_freq = rng.uniform(0.06, 0.32, size=(4, 3)).astype(np.float32)
        st.sway_phase = rng.uniform(0, 2 * np.pi, size=(4, 3)).astype(np.float32)
        st.next_blink = int(rng.uniform(0.6, 2.5) * self.fps)
        return st

    def _schedule_blink(self, st: MotionState) -> None:
        c = self.config
        if st.rng.random() < c.double_blink_p:
            gap = 0.35
        else:
            gap = c.blink_min_s + st.rng.gamma(3.0, c.blink_mean_extra_s / 3.0)
        st.next_blink = st.frame + max(len(self._blink), int(gap * self.fps))

    def __call__(self, jaw: np.ndarray, speech: bool, st: MotionState) -> MotionFrame:
        """Motion for the next len(jaw) frames given the mouth's jaw track (drives nods and activity)."""
        c = self.config
        n = len(jaw)
        blink = np.zeros(n, np.float32)
        head = np.zeros((n, 5), np.float32)
        dt = 1.0 / self.fps
        weights = np.array([0.55, 0.3, 0.15], np.float32)
        amp = np.array([c.sway_x, c.sway_y, c.sway_roll, c.sway_yaw], np.float32)
        # one-pole gains tuned at 25 fps, converted to this frame rate
        k = 25.0 / self.fps
        rise, fall, slow = (1.0 - (1.0 - g) ** k for g in (0.15, 0.04, 0.12))
        # critically damped spring for nods (~0.25 s time constant)
        omega = 2 * np.pi * 1.6
        for i in range(n):
            j = float(jaw[i])
            talking = speech and j > 0.05
            st.activity += (rise if talking else fall) * ((1.0 if talking else 0.0) - st.activity)
            # accents: the jaw rising well above its slow average
            accent = max(0.0, j - st.jaw_slow - 0.25)
            st.jaw_slow += slow * (j - st.jaw_slow)
            target = c.nod_gain * min(1.0, accent * 2.5)
            acc = omega * omega * (target - st.nod) - 2 * omega * st.nod_vel
            st.nod_vel += acc * dt
            st.nod += st.nod_vel * dt

            t = st.frame * dt
            sway = (weights[None, :] * np.sin(2 * np.pi * st.sway_freq * t + st.sway_phase)).sum(1)
            sway = sway * amp * (1.0 + c.speech_boost * st.activity)
            head[i, :3] = sway[:3]
            head[i, 3] = st.nod
            head[i, 4] = sway[3]

            if st.blink_pos < 0 and st.frame >= st.next_blink:
                st.blink_pos = 0
            if st.blink_pos >= 0:
                blink[i] = self._blink[st.blink_pos]
                st.blink_pos += 1
                if st.blink_pos >= len(self._blink):
                    st.blink_pos = -1
                    self._schedule_blink(st)
            st.frame += 1
        return MotionFrame(blink=blink, head=head)
