"""Audio/image reading and the streaming MP4 writer."""

import wave

import numpy as np
import pytest

from PIL import Image

from emo_stream.errors import AudioInputError, ImageInputError, OutputError
from emo_stream.media import (Mp4Writer, image_from_bytes, load_audio, load_image, probe_durations, resample,
                              to_mono_float)


def _write_wav(path, x: np.ndarray, rate: int, channels: int = 1):
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def test_load_audio_resamples_and_downmixes(tmp_path):
    rate = 44100
    t = np.arange(rate) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, left], axis=1).reshape(-1)
    _write_wav(tmp_path / "a.wav", stereo, rate, channels=2)
    x = load_audio(tmp_path / "a.wav")
    assert x.dtype == np.float32
    assert abs(len(x) - 16000) <= 2
    # still a 440 Hz tone of the same amplitude
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - 440) < 3
    assert 0.45 < np.abs(x).max() < 0.55


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 100])
def test_load_audio_rejects_broken_files(tmp_path, content):
    p = tmp_path / "broken.wav"
    p.write_bytes(content)
    with pytest.raises(AudioInputError):
        load_audio(p)


def test_load_audio_rejects_too_short_and_missing(tmp_path):
    _write_wav(tmp_path / "short.wav", np.zeros(100), 16000)
    with pytest.raises(AudioInputError, match="too short"):
        load_audio(tmp_path / "short.wav")
    with pytest.raises(AudioInputError, match="not found"):
        load_audio(tmp_path / "missing.wav")


def test_load_image_rejects_non_images(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_text("hello")
    with pytest.raises(ImageInputError):
        load_image(p)
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_pcm_helpers():
    pcm = np.array([32767, -32768, 0, 0], np.int16)
    mono = to_mono_float(pcm, channels=2)
    assert mono.shape == (2,) and abs(mono[0]) < 1e-3
    assert len(resample(np.zeros(48000, np.float32), 48000, 16000)) == 16000


def test_mp4_writer_durations_match(tmp_path):
    fps, seconds = 25, 3
    out = tmp_path / "v.mp4"
    with Mp4Writer(out, fps=fps, size=64) as w:
        for i in range(fps * seconds):
            w.write_frames(np.full((64, 64, 3), i % 255, np.uint8))
            w.write_audio(0.1 * np.sin(np.arange(640) / 5).astype(np.float32))
    d = probe_durations(out)
    assert d["frames"] == fps * seconds
    assert abs(d["audio_s"] - d["video_s"]) < 1 / fps


def test_load_image_scales_16_bit_and_flattens_transparency(tmp_path):
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # mode I;16
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8
    assert np.abs(img[..., 0].astype(int) - grey).max() <= 1  # not clipped to white
    rgba = np.zeros((8, 8, 4), np.uint8)  # transparent black, one opaque red pixel
    rgba[0, 0] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert tuple(img[0, 0]) == (255, 0, 0) and tuple(img[4, 4]) == (255, 255, 255)  # over white
    assert np.array_equal(image_from_bytes((tmp_path / "a.png").read_bytes()), img)


def test_mp4_writer_output_errors(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path, tmp_path / "file.txt" / "v.mp4"):
        with pytest.raises(OutputError, match="cannot write"):
            Mp4Writer(bad, fps=25, size=64)
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "odd.mp4", fps=25, size=65)
    with Mp4Writer(tmp_path / "no_suffix", fps=25, size=64) as w:  # an MP4 whatever the name
        w.write_frames(np.zeros((3, 64, 64, 3), np.uint8))
    assert probe_durations(tmp_path / "no_suffix")["frames"] == 3


def test_huge_image_headers_are_an_input_error(tmp_path):
    """A PNG that claims 30000x30000 pixels (a decompression bomb): a clear error, not Pillow's exception."""
    import struct
    import zlib

    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    data = bytearray((tmp_path / "small.png").read_bytes())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 30000, 30000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(ImageInputError, match="too large"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageInputError, match="too large"):
        image_from_bytes(bytes(data))
