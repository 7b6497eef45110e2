"""A/V sync test pattern (a flash following each frame's audio envelope, and a frame counter): backend.py."""
