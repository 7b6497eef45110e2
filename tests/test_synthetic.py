"""The synthetic talking-face generator: the mouth follows the speech envelope, in the prepare layout."""

from __future__ import annotations

import numpy as np

from emo_stream.training.dataset_layout import read_info, read_manifest, read_video, read_wav
from emo_stream.training.synthetic import generate_dataset, mouth_darkness, speech_envelope


def test_mouth_opening_follows_the_speech_envelope(tmp_path):
    recs = generate_dataset(tmp_path, clips=2, size=48, seconds=2.4, identities=2, seed=3)
    assert read_info(tmp_path).kind == "synthetic" and [r.id for r in read_manifest(tmp_path)] == [r.id for r in recs]
    envs = []
    for rec in recs:
        d = tmp_path / "clips" / rec.id
        frames, audio = read_video(d / "video.mp4"), read_wav(d / "audio.wav")
        assert frames.shape == (rec.frames, 48, 48, 3) and len(audio) == rec.frames * 640
        env = speech_envelope(audio, rec.frames)
        envs.append(env)
        assert env.max() > 0.8 and env.min() < 0.1  # speech and pauses
        measured = mouth_darkness(frames)
        assert np.corrcoef(measured, env)[0, 1] > 0.9
        meta = np.load(d / "meta.npz")
        assert np.allclose(meta["mouth_opening"], env, atol=2e-3)  # wav is PCM16
        assert meta["eyes"].min() < 0.2 < 0.9 < meta["eyes"].max()  # at least one blink
        assert np.ptp(meta["boxes"][:, 0]) > 0.2  # the head moves (pixels)
    assert not np.allclose(envs[0][:50], envs[1][:50])  # different speech, different mouths
