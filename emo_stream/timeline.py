"""The audio clock every part of emo-stream shares: one definition of each number.

Audio inside emo-stream is 16 kHz mono float32 (the rate of the audio encoders: wav2vec2, whisper).
At `fps` video frames per second, frame k covers audio samples [k * spf, (k + 1) * spf) with
spf = SAMPLE_RATE // fps (640 at the default 25 fps), so fps must divide SAMPLE_RATE.
"""

from __future__ import annotations

SAMPLE_RATE = 16000   # Hz, mono float32: the engine's and the models' audio rate
DEFAULT_FPS = 25      # EMO's video rate


def samples_per_frame(fps: int) -> int:
    """Audio samples one video frame covers; ValueError when fps does not divide SAMPLE_RATE."""
    if fps <= 0 or SAMPLE_RATE % fps:
        raise ValueError(f"fps must be positive and divide {SAMPLE_RATE} (e.g. 25 or 20): got {fps}")
    return SAMPLE_RATE // fps
