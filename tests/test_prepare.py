"""`emo-stream prepare` on talking-head clips (real ones from ../shared/data, else made here by the preview
animator from the built-in portrait and espeak speech), plus a corrupt file and a faceless video made here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emo_stream.errors import ConfigError
from emo_stream.media import Mp4Writer, load_audio
from emo_stream.training.dataset_layout import SAMPLES_PER_FRAME, read_manifest, read_video, read_wav
from emo_stream.training.prepare import PrepareOptions, prepare_dataset

SIZE = 64


@pytest.fixture(scope="module")
def talking_heads(tmp_path_factory, speech_wav) -> dict:
    """name -> talking-head MP4: real clips (25 and 30 fps) from ../shared/data, else two made here."""
    from tests.conftest import shared_data_dir

    shared = shared_data_dir()
    if shared is not None:
        return {name: shared / "clips" / name / "gt.mp4" for name in ("short_case_10", "emo_talk_emotion")}
    from emo_stream.registry import create_backend
    from emo_stream.generate import generate_file
    from emo_stream.default_avatar import default_portrait

    folder = tmp_path_factory.mktemp("made")
    backend = create_backend("preview", size=192)
    portrait = default_portrait(256)
    clips = {}
    for name, image in (("built_in", portrait), ("built_in_mirrored", portrait[:, ::-1].copy())):
        clips[name] = folder / f"{name}.mp4"
        generate_file(backend, image, speech_wav, clips[name], progress=False)
    return clips


@pytest.fixture(scope="module")
def prepared(talking_heads, tmp_path_factory):
    videos = tmp_path_factory.mktemp("videos")
    for name, path in talking_heads.items():
        (videos / f"{name}.mp4").symlink_to(path)
    (videos / "broken.mp4").write_bytes(next(iter(talking_heads.values())).read_bytes()[:4000])
    rng = np.random.default_rng(0)
    with Mp4Writer(videos / "sub" / "noface.mp4", fps=25, size=96) as w:  # noise, with a tone as audio
        w.write_frames(rng.integers(0, 255, (50, 96, 96, 3), dtype=np.uint8))
        w.write_audio(0.3 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 220).astype(np.float32))
    with Mp4Writer(videos / "short.mp4", fps=25, size=96) as w:  # 0.5 s: shorter than --min-seconds
        w.write_frames(rng.integers(0, 255, (12, 96, 96, 3), dtype=np.uint8))
        w.write_audio(np.zeros(8000, np.float32))
    out = tmp_path_factory.mktemp("prepared")
    opts = PrepareOptions(size=SIZE, max_seconds=2.0, detect_every=5)
    report = prepare_dataset(videos, out, opts, workers=2, progress=False)
    return videos, out, opts, report


def test_prepares_clips_and_reports_bad_videos(prepared, talking_heads):
    videos, out, _, report = prepared
    clips = read_manifest(out)
    assert sorted(c.source.split("/")[-1] for c in clips) == sorted(f"{n}.mp4" for n in talking_heads)
    skipped = report["skipped"]
    assert set(skipped) == {str(videos / n) for n in ("broken.mp4", "sub/noface.mp4", "short.mp4")}
    assert "too short" in skipped[str(videos / "short.mp4")]
    assert "corrupt" in skipped[str(videos / "broken.mp4")]
    assert "face" in skipped[str(videos / "sub" / "noface.mp4")]
    assert json.loads((out / "report.json").read_text())["clips"] == 2


def test_clip_contents_are_25fps_crops_with_synced_audio(prepared):
    _, out, _, _ = prepared
    for rec in read_manifest(out):
        d = out / "clips" / rec.id
        frames = read_video(d / "video.mp4")
        assert frames.shape == (50, SIZE, SIZE, 3) == (rec.frames, rec.size, rec.size, 3)  # 2 s at 25 fps
        audio = read_wav(d / "audio.wav")
        assert len(audio) == rec.frames * SAMPLES_PER_FRAME
        source = load_audio(rec.source)[: len(audio)]
        assert np.corrcoef(audio, source)[0, 1] > 0.99  # the clip's own audio, from its start
        meta = np.load(d / "meta.npz")
        boxes = meta["boxes"]
        assert boxes.shape == (50, 4) and np.isfinite(boxes).all()
        # face-centred crop: the face box sits inside the square, around the middle, a sensible size
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        assert np.all(np.abs(cx - SIZE / 2) < SIZE * 0.2) and np.all(np.abs(cy - SIZE / 2) < SIZE * 0.25)
        assert 0.3 < np.median(boxes[:, 2] - boxes[:, 0]) / SIZE < 0.6
        mask = meta["mask"]
        x0, y0, x1, y1 = boxes[0].astype(int)
        assert mask[(y0 + y1) // 2, (x0 + x1) // 2] == 1 and mask[0, 0] == 0
        assert meta["speed"].shape == (50,) and np.all(meta["speed"] >= 0) and np.all(meta["speed"] < 20)
        assert "speed_bucket" not in meta   # bucketing is the model config's (speed.centers), not the data's
        # the face is a face: landmark mouth opening varies while speaking
        assert meta["mouth_opening"].std() > 0.005


def test_rerun_resumes_without_redoing_work(prepared):
    videos, out, opts, _ = prepared
    before = (out / "manifest.jsonl").read_text()
    report = prepare_dataset(videos, out, opts, workers=1, progress=False)
    assert report["new_clips"] == 0 and (out / "manifest.jsonl").read_text() == before


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out", PrepareOptions(size=SIZE))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no videos"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", PrepareOptions(size=SIZE))


def test_rotated_phone_video_is_turned_upright(talking_heads, tmp_path):
    """Phones store portrait video sideways plus a display rotation; players (and prepare) turn it upright."""
    import shutil
    import subprocess

    import av

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg is not installed")
    videos = tmp_path / "videos"
    videos.mkdir()
    phone, sideways = videos / "phone.mp4", tmp_path / "sideways.mp4"
    # pixels turned a quarter clockwise, then (stream copy) tagged to be shown turned back: FFmpeg 5 writes
    # the tag as the display matrix
    subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(next(iter(talking_heads.values()))),
                    "-t", "1.4", "-vf", "transpose=1,scale=192:192", "-c:a", "aac", str(sideways)], check=True)
    subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(sideways), "-c", "copy", "-metadata:s:v:0", "rotate=90",
                    str(phone)], check=True)
    with av.open(str(phone)) as c:
        if next(c.decode(video=0)).rotation != 90:
            pytest.skip("this ffmpeg does not write the rotate tag as a display matrix")
    out = tmp_path / "out"
    report = prepare_dataset(videos, out, PrepareOptions(size=SIZE, detect_every=5), workers=1, progress=False)
    assert report["skipped"] == {} and len(read_manifest(out)) == 1
