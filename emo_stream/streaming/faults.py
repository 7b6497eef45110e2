"""What the engine does when a backend call goes wrong: tell a failure of one batch from a broken device, and
notice a call that never returns.

    out of memory in one batch   retried in halves (down to one session per call): the sessions whose own call
                                 still fails get the error, the others get their frames one step late
    device error                 (a CUDA error other than out-of-memory, or `unhealthy_after_failures` failed
                                 calls in a row) the engine turns unhealthy: every session in the call gets the
                                 error, new sessions are refused, /healthz answers 503, a LiveKit worker stops
                                 taking rooms. Sticky: a process with a lost device is restarted, not nursed
    a call that never returns    the watchdog fails that call's sessions after `call_timeout_s` and reports the
                                 engine stalled (refusing new sessions) until the call returns; if no generator
                                 worker is left, every session gets the error: nothing would make its frames
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from emo_stream.errors import EmoStreamError

# messages of errors that leave a CUDA context unusable (torch raises most of them as RuntimeError)
_DEVICE_MARKERS = ("cuda error", "device-side assert", "cublas_status", "cudnn_status", "cudaerror",
                   "illegal memory access", "unspecified launch failure", "hip error", "device lost",
                   "ecc error", "nvml", "no cuda gpus are available")


class EngineUnhealthyError(EmoStreamError):
    """The engine's device failed (or a call on it hangs): it takes no new sessions."""


class BackendStalledError(EmoStreamError):
    """A backend call did not return within the engine's call_timeout_s."""


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("OutOfMemoryError", "OutOfMemory") or "out of memory" in str(exc).lower()


def is_device_error(exc: BaseException) -> bool:
    """A failure of the device itself (retrying on it is pointless), not of one batch (out of memory, a bad input)."""
    if is_out_of_memory(exc):
        return False
    if type(exc).__name__ == "AcceleratorError":    # torch >= 2.8: CUDA errors raised as their own type
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _DEVICE_MARKERS)


@dataclass(eq=False)
class Call:
    """One backend call in flight, for the watchdog."""

    stage: str
    sessions: list[Any]
    started: float = field(default_factory=time.monotonic)
    abandoned: bool = False        # the watchdog gave up on it: its results are discarded


class Health:
    """The engine's health: ok, device_error (sticky) or stalled (while an abandoned call has not returned)."""

    def __init__(self, unhealthy_after: int) -> None:
        self._lock = threading.Lock()
        self._unhealthy_after = unhealthy_after
        self._failures_in_a_row = 0
        self.device_error: str | None = None
        self.failed_calls = 0
        self.retried_calls = 0
        self.stalled_calls = 0          # abandoned and not yet returned
        self.stalls_total = 0
        self._calls: set[Call] = set()

    # -- call accounting (stage threads) --------------------------------------------------------
    def begin(self, stage: str, sessions: list[Any]) -> Call:
        call = Call(stage, sessions)
        with self._lock:
            self._calls.add(call)
        return call

    def end(self, call: Call, ok: bool, exc: BaseException | None = None, in_a_row: bool = True) -> None:
        """Record how a call ended. `in_a_row=False`: a failure the caller retries job by job (a batch), whose
        retries are the calls that count towards `unhealthy_after` (else one bad job would count twice)."""
        with self._lock:
            self._calls.discard(call)
            if call.abandoned:
                self.stalled_calls -= 1
            if ok:
                self._failures_in_a_row = 0
            else:
                self.failed_calls += 1
                self._failures_in_a_row += int(in_a_row)
                if exc is not None and is_device_error(exc):
                    self._set_device_error(exc)
                elif self._failures_in_a_row >= self._unhealthy_after and self.device_error is None:
                    self._set_device_error(exc, f"{self._failures_in_a_row} backend calls failed in a row")

    def _set_device_error(self, exc: BaseException | None, why: str | None = None) -> None:
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        self.device_error = f"{why}, the last: {cause}" if why else cause

    def overdue(self, timeout: float) -> list[Call]:
        """Calls running longer than `timeout` not yet given up on; they are marked abandoned here."""
        now = time.monotonic()
        out = []
        with self._lock:
            for call in self._calls:
                if not call.abandoned and now - call.started > timeout:
                    call.abandoned = True
                    self.stalled_calls += 1
                    self.stalls_total += 1
                    out.append(call)
        return out

    def busy_stages(self, stage: str) -> tuple[int, int]:
        """(calls of `stage` in flight, of which abandoned)."""
        with self._lock:
            calls = [c for c in self._calls if c.stage == stage]
            return len(calls), sum(c.abandoned for c in calls)

    @property
    def healthy(self) -> bool:
        return self.device_error is None and self.stalled_calls == 0

    def status(self) -> dict:
        with self._lock:
            if self.device_error is not None:
                state, reason = "device_error", self.device_error
            elif self.stalled_calls:
                state, reason = "stalled", f"{self.stalled_calls} backend call(s) did not return in time"
            else:
                state, reason = "ok", None
            return {"status": state, "reason": reason, "failed_calls": self.failed_calls,
                    "retried_calls": self.retried_calls, "stalls": self.stalls_total}
