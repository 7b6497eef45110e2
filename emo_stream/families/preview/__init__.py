"""The CPU preview animator: a weight-free, real-time backend (`--backend preview`).

mouth.py (audio -> mouth shape), motion.py (blinks, head motion, nods), warp.py (landmark-anchored
image warping and the mouth interior), backend.py (the Backend protocol implementation). The project's own
portrait, which every backend may animate, is emo_stream.default_avatar.
"""

from emo_stream.families import Family

FAMILY = Family(
    name="preview", title="CPU preview animator",
    summary="CPU preview animator: warps the portrait to the audio (no model, real-time on one core)",
    backend="emo_stream.families.preview.backend:create_backend",
)
