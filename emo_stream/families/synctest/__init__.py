"""A/V sync test pattern (a flash following each frame's audio envelope, and a frame counter): backend.py,
and measure.py (reading the pattern back: the offset of the picture against its audio)."""

from emo_stream.families import Family

FAMILY = Family(
    name="synctest", title="A/V sync test pattern",
    summary="A/V sync test pattern: a flash following each frame's audio envelope and a frame counter (no model)",
    backend="emo_stream.families.synctest.backend:create_backend",
)
