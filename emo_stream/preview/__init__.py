"""The CPU preview animator: a weight-free, real-time backend (`--backend preview`).

mouth.py (audio -> mouth shape), motion.py (blinks, head motion, nods), warp.py (landmark-anchored
image warping and the mouth interior), default_avatar.py (the project's own portrait), backend.py
(the Backend protocol implementation).
"""

from emo_stream.preview.backend import PreviewAvatar, PreviewBackend, PreviewState, frame_portrait
from emo_stream.preview.default_avatar import default_portrait

__all__ = ["PreviewAvatar", "PreviewBackend", "PreviewState", "default_portrait", "frame_portrait"]
