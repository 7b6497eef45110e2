"""--virtual-camera: the latest session's video as a system camera (pyvirtualcam; video only).

Needs the optional extra (`pip install emo-stream[camera]`) and a camera device: v4l2loopback on
Linux, the OBS Virtual Camera on Windows/macOS. Without them the server logs why and carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from server.sync import QueueClosed

if TYPE_CHECKING:
    from server.sessions import SessionManager

log = logging.getLogger(__name__)


class VirtualCamera:
    """Follows the most recently started session; between sessions it keeps showing the last frame."""

    def __init__(self, sessions: "SessionManager", camera: Any):
        self.sessions = sessions
        self.camera = camera
        self._latest: np.ndarray = np.zeros((camera.height, camera.width, 3), np.uint8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_loop, name="virtual-camera", daemon=True)
        self._task = asyncio.create_task(self._follow(), name="virtual-camera-follow")
        self._thread.start()

    @classmethod
    def try_start(cls, sessions: "SessionManager", size: int, fps: int) -> "VirtualCamera | None":
        try:
            import pyvirtualcam
        except ImportError:
            log.warning("--virtual-camera: pyvirtualcam is not installed (pip install 'emo-stream[camera]'); "
                        "continuing without a virtual camera")
            return None
        try:
            camera = pyvirtualcam.Camera(width=size, height=size, fps=fps)
        except Exception as exc:  # no v4l2loopback device / OBS virtual camera
            log.warning("--virtual-camera: no virtual camera device available (%s); continuing without one", exc)
            return None
        log.info("virtual camera %s: %dx%d at %d fps", camera.device, size, size, fps)
        return cls(sessions, camera)

    async def _follow(self) -> None:
        while not self._stop.is_set():
            session = self.sessions.latest()
            if session is None or session.closed:
                await asyncio.sleep(0.2)
                continue
            sub = session.playout.subscribe("virtual-camera", frames=2, audio=None)
            try:
                while not session.closed:
                    frame = await sub.frames.get()
                    self._latest = frame.image  # the sender thread picks up the newest frame
                    newer = self.sessions.latest()
                    if newer is not None and newer is not session:
                        break
            except QueueClosed:
                pass
            finally:
                sub.close()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self.camera.send(self._latest)
            self.camera.sleep_until_next_frame()

    def stop(self) -> None:
        self._stop.set()
        self._task.cancel()
        self._thread.join(timeout=1.0)
        self.camera.close()
