"""Due times of a session's frames: when a real-time consumer needs each one (a pure policy, no threads).

Each frame k has a due time D(k) = max(D(k-1) + 1/fps, the time its audio and look-ahead were complete).
Idle frames (no pushed audio) are planned at most `lead_frames` ahead of the clock. While the session
waits on its consumer (output queue full), the clock keeps running but the session is not behind:
the next frame is due no earlier than when planning resumes. Fall-behind policy: a segment whose first
frame is more than max_delay_ms past due is held (previous image repeated, no backend call); a frame
ready more than late_ms after its due time counts as late.
"""

from __future__ import annotations

import numpy as np


def is_behind(now: float, due: float, max_delay_ms: float) -> bool:
    """Fall-behind policy: a segment first due at `due` is held (not generated) at time `now`."""
    return (now - due) * 1000 > max_delay_ms


class DuePacer:
    """One session's due-time clock. The planner (under the session's lock) asks it for the due times
    of each segment it cuts; `next_due` is D(next index to plan)."""

    def __init__(self, fps: int, start: float, *, lead_frames: int, max_delay_ms: float, late_ms: float) -> None:
        self.fps = fps
        self.lead_frames = lead_frames
        self.max_delay_ms = max_delay_ms
        self.late_ms = late_ms
        self.next_due = start
        self.blocked = False   # the last plan stopped on output capacity

    def block(self) -> None:
        """Planning stopped because the consumer has not read enough: waiting, not falling behind."""
        self.blocked = True

    def _resume(self, now: float) -> None:
        if self.blocked:
            self.next_due = max(self.next_due, now)
            self.blocked = False

    def speech(self, now: float, complete: np.ndarray) -> np.ndarray:
        """Due times of a speech segment whose frames' audio was complete at `complete` (clock seconds)."""
        self._resume(now)
        due = np.empty(len(complete), np.float64)
        d = self.next_due
        for i in range(len(complete)):
            due[i] = d = max(d, complete[i])
            d += 1 / self.fps
        self.next_due = float(due[-1]) + 1 / self.fps
        return due

    def idle(self, now: float, n: int) -> np.ndarray | None:
        """Due times of the next n idle frames, or None while they are further than the idle lead ahead."""
        self._resume(now)
        if self.next_due + (n - 1) / self.fps > now + self.lead_frames / self.fps:
            return None
        due = self.next_due + np.arange(n) / self.fps
        self.next_due = float(due[-1]) + 1 / self.fps
        return due

    def restart(self, now: float) -> None:
        """After clear(): the timeline goes on from now."""
        self.next_due = now
        self.blocked = False

    def skip(self, frames: int = 1) -> None:
        """Frames emitted without planning (clear's held pictures) take their slots on the timeline."""
        for _ in range(frames):
            self.next_due += 1 / self.fps

    def behind(self, now: float, due: float) -> bool:
        """Fall-behind policy: a segment first due at `due` is held instead of generated."""
        return is_behind(now, due, self.max_delay_ms)

    def late(self, now: float, due: float) -> bool:
        return (now - due) * 1000 > self.late_ms
