"""GPU stage overlap: each engine stage thread gets its own CUDA stream, and hand-offs carry events.

Threads alone overlap only the CPU side (Python, kernel launches): kernels of all threads still queue
on one default CUDA stream. With a stream per stage, the audio encoder, the denoiser and the decoder
run concurrently on the GPU; an event recorded after a stage's work and waited on by the next stage
keeps each segment's data dependencies. Inactive (all no-ops) when the backend is not on CUDA.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _cuda_device(dev: Any) -> Any:
    if dev is None or getattr(dev, "type", None) != "cuda":
        return None
    try:
        import torch

        return dev if torch.cuda.is_available() else None
    except ImportError:
        return None


class StageStreams:
    """Per-thread CUDA streams and cross-stage events for a backend on CUDA."""

    def __init__(self, device: Any, enabled: bool = True) -> None:
        """`device`: the backend's declared device (emo_stream.backend.capabilities)."""
        self.device = _cuda_device(device) if enabled else None

    @property
    def active(self) -> bool:
        return self.device is not None

    def enter_stage(self, name: str) -> None:
        """Call at the start of a stage thread: its kernels go to a stream of its own."""
        if not self.active:
            return
        import torch

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        torch.cuda.set_stream(torch.cuda.Stream(device=index))
        log.debug("stage %s runs on its own CUDA stream", name)

    def mark(self) -> Any:
        """An event after the work this thread has queued so far (None when inactive)."""
        if not self.active:
            return None
        import torch

        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, events) -> None:
        """Make this thread's stream wait for other stages' events (no CPU blocking)."""
        if not self.active:
            return
        import torch

        stream = torch.cuda.current_stream()
        for event in events:
            if event is not None:
                stream.wait_event(event)

    def synchronize(self) -> None:
        """Block until this thread's queued work is done (used where results leave the stage pipeline
        through a thread without a stage stream, e.g. prepare_avatar)."""
        if self.active:
            import torch

            torch.cuda.current_stream().synchronize()
