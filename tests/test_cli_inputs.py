"""The CLI as a newcomer uses it: odd but legitimate inputs work (durations in sync), broken ones exit 2
with one line that says what to do (no traceback). Inputs are made here, in tmp_path."""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from emo_stream.media import load_audio, probe_durations
from server.cli import main as cli_main

SIZE = 64
FPS = 25


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    rc = cli_main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    return rc, err


def _assert_one_line_error(rc: int, err: list[str], command: str, *words: str) -> None:
    assert rc == 2, err
    assert not any("Traceback" in line for line in err), err
    assert err and err[-1].startswith(f"emo-stream {command}: error:"), err
    for word in words:
        assert word in err[-1], err[-1]


def _write_stereo_mp3(path: Path, mono_16k: np.ndarray, rate: int = 44100) -> None:
    """The speech as a stereo 44.1 kHz MP3 (PyAV's libmp3lame)."""
    from emo_stream.media import resample

    x = resample(mono_16k, 16000, rate)
    stereo = np.stack([x, x]).astype(np.float32)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libmp3lame", rate=rate)
        s.layout = "stereo"
        s.format = "fltp"
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)


@pytest.fixture(scope="module")
def portrait(portrait_path, tmp_path_factory) -> Path:
    """A portrait at 256 px (face detection stays fast): a real photo with ../shared/data, else the built-in one."""
    from tests.conftest import shared_data_dir

    shared = shared_data_dir()
    source = shared / "portraits" / "hallo_1.jpg" if shared is not None else portrait_path
    p = tmp_path_factory.mktemp("portrait") / "portrait.jpg"
    Image.open(source).convert("RGB").resize((256, 256), Image.LANCZOS).save(p)
    return p


def test_odd_inputs_work_and_stay_in_sync(portrait, speech_16k, tmp_path, capsys):
    """16-bit grey PNG portrait + stereo 44.1 kHz MP3 + --out without a suffix."""
    grey16 = tmp_path / "grey16.png"
    grey = np.asarray(Image.open(portrait).convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(grey16)  # mode I;16: Pillow's convert("RGB") used to turn it white
    mp3 = tmp_path / "speech.mp3"
    _write_stereo_mp3(mp3, speech_16k)
    out = tmp_path / "new" / "folder" / "result"
    out.parent.mkdir(parents=True)
    rc, err = _cli(capsys, "generate", "--image", grey16, "--audio", mp3, "--out", out, "--size", SIZE,
                   "--no-progress")
    assert rc == 0, err
    seconds = len(load_audio(mp3)) / 16000
    d = probe_durations(out)
    assert abs(d["frames"] - round(seconds * FPS)) <= 1
    assert abs(d["video_s"] - d["audio_s"]) < 1 / FPS
    assert abs(d["audio_s"] - seconds) < 1 / FPS


def test_negative_seed_works_with_the_preview_backend(portrait, tmp_path, capsys):
    audio = tmp_path / "tone.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)  # 8 kHz telephone audio
        w.writeframes((0.3 * 32767 * np.sin(np.arange(2400) / 8000 * 2 * np.pi * 220)).astype("<i2").tobytes())
    out = tmp_path / "seed.mp4"
    rc, err = _cli(capsys, "generate", "--image", portrait, "--audio", audio, "--out", out, "--size", SIZE,
                   "--seed", "-1", "--no-progress")
    assert rc == 0, err
    d = probe_durations(out)
    assert abs(d["frames"] - round(0.3 * FPS)) <= 1 and abs(d["video_s"] - d["audio_s"]) < 1 / FPS


def _corrupt_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(16000, "<i2").tobytes())
    data = bytearray(path.read_bytes())
    data[:4] = b"RIFX"              # big-endian RIFF marker ...
    data[20:22] = b"\xff\xff"       # ... and an unknown codec tag
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case, args, words", [
    ("odd_size", ["--size", "101"], ["even"]),
    ("fps_zero", ["--fps", "0"], ["fps"]),
    ("fps_negative", ["--fps", "-5"], ["fps"]),
    ("fps_24", ["--fps", "24"], ["fps", "16000"]),
    ("emo_size_zero", ["--backend", "emo", "--model", "tiny", "--size", "0"], ["size"]),
    ("emo_guidance_nan", ["--backend", "emo", "--model", "tiny", "--guidance", "nan"], ["guidance"]),
    ("out_is_a_folder", ["--out", "{tmp}"], ["cannot write"]),
    ("out_under_a_file", ["--out", "{tmp}/notes.txt/x.mp4"], ["cannot write"]),
    ("out_avi", ["--out", "{tmp}/x.avi"], ["cannot write", "MP4", ".avi"]),
    ("out_in_a_missing_folder", ["--out", "{tmp}/no/such/x.mp4"], ["does not exist", "create it first"]),
    ("preview_with_a_model", ["--backend", "preview", "--model", "tiny"], ["preview", "no model", "tiny"]),
    ("emo_without_a_model", ["--backend", "emo"], ["needs --model", "checkpoint folder", "EchoMimic/Hallo",
                                                   "sd15/tiny"]),
    ("corrupt_wav_header", ["--audio", "{tmp}/corrupt.wav"], ["cannot decode audio", "WAV"]),
    ("wav_header_says_7_hz", ["--audio", "{tmp}/rate7.wav"], ["7 Hz", "re-encode"]),
    ("tiny_photo", ["--image", "{tmp}/tiny.jpg"], ["too small"]),
])
def test_generate_errors_are_one_line(case, args, words, portrait, speech_wav, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file where a folder is expected")
    _corrupt_wav(tmp_path / "corrupt.wav")
    with wave.open(str(tmp_path / "rate7.wav"), "wb") as w:  # 1 s of 16 kHz audio that claims 7 Hz: 38 min
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(7)
        w.writeframes(np.zeros(16000, "<i2").tobytes())
    Image.open(portrait).resize((20, 20), Image.BILINEAR).save(tmp_path / "tiny.jpg")  # no face detector finds one
    base = {"--image": str(portrait), "--audio": str(speech_wav), "--out": str(tmp_path / "out.mp4"),
            "--size": str(SIZE)}
    extra = []
    for key, value in zip(args[::2], args[1::2]):
        value = value.format(tmp=tmp_path)
        if key in base:
            base[key] = value
        else:
            extra += [key, value]
    argv = ["generate", "--no-progress", "--steps", "1"] + [x for kv in base.items() for x in kv] + extra
    rc, err = _cli(capsys, *argv)
    _assert_one_line_error(rc, err, "generate", *words)


@pytest.mark.parametrize("args, words", [
    (["--segment-seconds", "0"], ["--segment-seconds"]),
    (["--segment-seconds", "2", "--min-seconds", "3"], ["--segment-seconds", "--min-seconds"]),
    (["--min-seconds", "-1"], ["--min-seconds"]),
    (["--max-seconds", "0"], ["--max-seconds"]),
    (["--out", "{tmp}/notes.txt/dataset"], ["cannot write"]),
])
def test_prepare_option_errors_are_one_line(args, words, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "notes.txt").write_text("a file where a folder is expected")
    argv = ["prepare", "--videos", str(videos), "--size", str(SIZE), "--workers", "1", "--no-progress"]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "out")]
    rc, err = _cli(capsys, *argv, *[a.format(tmp=tmp_path) for a in args])
    _assert_one_line_error(rc, err, "prepare", *words)


def test_prepare_with_no_usable_video_fails_clearly(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    rc, err = _cli(capsys, "prepare", "--videos", videos, "--out", tmp_path / "out", "--size", SIZE,
                   "--workers", "1", "--no-progress")
    _assert_one_line_error(rc, err, "prepare", "no usable clips", "broken.mp4", "report.json")


@pytest.mark.parametrize("sets, words", [
    (["train.output_dir={tmp}/notes.txt/run"], ["cannot write", "output_dir"]),
    (["train.device=cuda:1"], ["train.device", "CUDA_VISIBLE_DEVICES"]),
    pytest.param(["train.device=cuda"], ["CUDA is not available"],
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available")),
])
def test_train_errors_are_one_line(sets, words, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file where a folder is expected")
    config = tmp_path / "train.yaml"
    config.write_text(f"stage: 1\nmodel: {{init: tiny}}\ndata: {{root: {tmp_path}}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 1}}\n")
    argv = ["train", "--stage", "1", "--config", str(config), "--no-progress", "--resume", "no"]
    for item in sets:
        argv += ["--set", item.format(tmp=tmp_path)]
    rc, err = _cli(capsys, *argv)
    _assert_one_line_error(rc, err, "train", *words)


def test_a_preset_warns_that_weights_are_random(caplog):
    """The tiny/sd15 presets are for benchmarks: say so, or the noise looks like a bug."""
    import logging

    from emo_stream.registry import create_backend

    with caplog.at_level(logging.WARNING, logger="emo_stream"):
        backend = create_backend("emo", "tiny", size=SIZE, device="cpu", steps=1)
    assert backend.name == "emo"
    assert any("random weights" in r.getMessage() for r in caplog.records)


def test_prepare_with_a_bad_audio_features_model_stops_without_marking_videos_skipped(tmp_path, capsys):
    """The model is the user's error for every video: one line, and a re-run (fixed model) retries them all."""
    import json

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "out"
    rc, err = _cli(capsys, "prepare", "--videos", videos, "--out", out, "--size", SIZE, "--workers", "1",
                   "--audio-features", tmp_path / "no-such-model", "--no-progress")
    _assert_one_line_error(rc, err, "prepare", "model not found")
    report = out / "report.json"
    assert not report.is_file() or json.loads(report.read_text())["skipped"] == {}


def test_generate_checks_inputs_and_output_before_loading_the_model(portrait, speech_wav, tmp_path, capsys):
    """A model can take minutes to load: a bad --out must be reported first, not after."""
    rc, err = _cli(capsys, "generate", "--image", str(portrait), "--audio", str(speech_wav),
                   "--out", str(tmp_path), "--backend", "emo", "--model", str(tmp_path / "no-such-model"))
    _assert_one_line_error(rc, err, "generate", "folder")
    assert "model" not in err[0]


def test_the_default_backend_notice_is_not_a_warning(caplog):
    """No model, no backend: the preview, mentioned at INFO level (not a warning on every first run)."""
    import logging

    from emo_stream.registry import create_backend

    with caplog.at_level(logging.INFO, logger="emo_stream"):
        backend = create_backend(None, None, size=SIZE)
    assert backend.name == "preview"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("preview" in r.getMessage() for r in caplog.records)


def test_bot_avatar_that_is_no_image_is_a_one_line_error(speech_wav, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a portrait")
    rc, err = _cli(capsys, "bot", "--url", "http://127.0.0.1:9", "--audio", speech_wav, "--out", tmp_path / "r.mp4",
                   "--avatar", notes)
    _assert_one_line_error(rc, err, "bot", "notes.txt is not an image", "JPEG")


def test_a_port_in_use_is_reported_before_the_engine_starts(tmp_path):
    import asyncio
    import socket

    from emo_stream.errors import EmoStreamError
    from server.app import StreamServer
    from server.config import load_config

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # a model that does not exist: had the engine been built first, that would be the error
        cfg = load_config(None, port=port, backend="emo", model=str(tmp_path / "no-such-model"))
        with pytest.raises(EmoStreamError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(StreamServer(cfg).start())


def test_an_interrupted_write_leaves_no_file_under_the_output_name(tmp_path):
    from emo_stream.media import Mp4Writer

    out = tmp_path / "x.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(out, fps=FPS, size=SIZE) as w:
            w.write_frames(np.zeros((3, SIZE, SIZE, 3), np.uint8))
            assert not out.exists()  # written under a temporary name until complete
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with Mp4Writer(out, fps=FPS, size=SIZE) as w:
        w.write_frames(np.zeros((3, SIZE, SIZE, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"] and probe_durations(out)["frames"] == 3


def test_cpu_emo_uses_half_the_cores_unless_told():
    from emo_stream.families.emo.backend import cpu_threads_default

    assert [cpu_threads_default(n) for n in (1, 2, 4, 16, 64)] == [1, 1, 2, 8, 8]
