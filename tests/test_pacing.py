"""The due-time policy on its own (no threads, no engine): emo_stream.streaming.pacing.DuePacer."""

from __future__ import annotations

import numpy as np
import pytest

from emo_stream.streaming.pacing import DuePacer, is_behind

FPS = 25
T = 1 / FPS


def pacer(start: float = 10.0, lead: int = 4) -> DuePacer:
    return DuePacer(FPS, start, lead_frames=lead, max_delay_ms=1000.0, late_ms=200.0)


def test_speech_due_is_one_period_apart_or_when_its_audio_was_complete():
    p = pacer(start=10.0)
    # audio complete early: frames are due one period apart from the pacer's start
    due = p.speech(10.0, np.array([9.0, 9.0, 9.0]))
    np.testing.assert_allclose(due, [10.0, 10.0 + T, 10.0 + 2 * T])
    assert p.next_due == pytest.approx(10.0 + 3 * T)
    # audio arriving late (a real-time sender): each frame is due when its audio was complete
    due = p.speech(11.0, np.array([10.5, 10.6, 10.6]))
    np.testing.assert_allclose(due, [10.5, 10.6, 10.6 + T])
    assert p.next_due == pytest.approx(10.6 + 2 * T)


def test_idle_frames_wait_for_the_lead():
    p = pacer(start=0.0, lead=4)
    due = p.idle(0.0, 4)                       # frames 0..3 are within 4 frames of the clock
    np.testing.assert_allclose(due, [0, T, 2 * T, 3 * T])
    assert p.idle(0.0, 4) is None              # 4..7 would be 7 frames ahead: not yet
    assert p.idle(3 * T, 4) is not None        # the clock moved on three frames: now they are due
    assert p.next_due == pytest.approx(8 * T)


def test_waiting_on_the_consumer_is_not_falling_behind():
    p = pacer(start=0.0)
    p.speech(0.0, np.zeros(2))
    p.block()                                  # output queue full for 5 s
    due = p.speech(5.0, np.zeros(2))
    assert due[0] == 5.0 and not p.behind(5.0, due[0])
    # without the block, the same segment would have been due long ago: held
    q = pacer(start=0.0)
    q.speech(0.0, np.zeros(2))
    due = q.speech(5.0, np.zeros(2))
    assert due[0] == pytest.approx(2 * T) and q.behind(5.0, due[0])


def test_restart_and_skip_after_clear():
    p = pacer(start=0.0)
    p.speech(0.0, np.zeros(8))
    p.block()
    p.restart(3.0)
    p.skip(2)                                  # two held pictures emitted at once
    assert p.next_due == pytest.approx(3.0 + 2 * T) and not p.blocked


def test_thresholds():
    assert is_behind(2.0, 0.99, 1000.0) and not is_behind(2.0, 1.0, 1000.0)
    p = pacer()
    assert p.late(1.0, 0.79) and not p.late(1.0, 0.8)
