"""Reading portraits and audio, and writing MP4 (H.264 + AAC) incrementally, with PyAV."""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emo_stream.errors import AudioInputError, ImageInputError, OutputError
from emo_stream.pcm import pcm16_to_float
from emo_stream.timeline import SAMPLE_RATE  # everything is resampled to the models' audio rate

log = logging.getLogger(__name__)

MIN_INPUT_RATE = 4000  # Hz: telephone speech is 8 kHz; lower rates in a file mean a broken header


# One decode policy for every portrait, trusted or not (uploads, LiveKit metadata and URLs, --avatar files):
# only these formats, recognised by their magic bytes before Pillow sees the data (Pillow would otherwise
# pick any of its ~40 decoders - TIFF, BMP, GIF, ICO, TGA, SGI, DDS, EPS via Ghostscript...), and a pixel
# count checked from the header before anything is decoded.
PORTRAIT_FORMATS = ("JPEG", "PNG", "WEBP")
# width * height of portraits arriving as bytes (uploads, LiveKit); the server's limits.max_image_pixels
MAX_PORTRAIT_PIXELS = 25_000_000
# an operator's own file (--avatar, generate --image) may be a full-size camera photo (a 61 MP sensor)
MAX_FILE_PIXELS = 100_000_000


def image_format(head: bytes) -> str | None:
    """The allowed format the first 12 bytes of a file announce (PORTRAIT_FORMATS), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _open_checked(source, head: bytes, what: str, max_pixels: int) -> Image.Image:
    """Open (header only) an allowed image no larger than max_pixels; ImageInputError naming `what`."""
    fmt = image_format(head)
    if fmt is None:
        raise ImageInputError(f"{what}: not a JPEG, PNG or WebP image (other formats are refused: convert it)")
    try:
        img = Image.open(source, formats=[fmt])
    except Image.DecompressionBombError:   # Pillow's own guard (far above ours): the same answer
        raise ImageInputError(f"{what}: the image is too large (limit {max_pixels} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"{what}: not a readable image ({exc.__class__.__name__})") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageInputError(f"{what}: {width}x{height} is too large (limit {max_pixels} pixels); use a smaller "
                              f"photo")
    return img


def load_image(path: str | Path, max_pixels: int = MAX_FILE_PIXELS) -> np.ndarray:
    """Read a JPEG, PNG or WebP file as RGB uint8 (H, W, 3), honouring EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"image not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            with _open_checked(f, head, f"image {path}", max_pixels) as img:
                return _to_rgb(img)
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"not a readable image: {path} ({exc.__class__.__name__})") from None


_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _reduced(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink by a whole factor so the longer side is at most about `max_side`, upright (EXIF). JPEGs were
    already decoded small (draft); this bounds the copies made after decoding (RGB, arrays) for the rest."""
    orientation = img.getexif().get(0x0112, 1)
    factor = -(-max(img.size) // max_side)
    if img.mode == "1":
        img = img.convert("L")  # 1 byte a pixel either way in Pillow; reduce() needs L
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    if factor > 1:
        img = img.reduce(factor)
    method = _EXIF_TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def _to_rgb(img: Image.Image, max_side: int | None = None) -> np.ndarray:
    """Any PIL image -> RGB uint8, upright (EXIF), transparency over white, 16-bit/float scaled to 8 bits;
    with `max_side`, shrunk early (before the full-size copies) so the longer side is at most about that."""
    if max_side and max(img.size) > max_side:
        img.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale (no-op otherwise)
        img = _reduced(img, max_side)
    else:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's convert("RGB") clips these to 0..255 (a 16-bit grey PNG comes out white): scale instead
        x = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I") and x.max(initial=0) > 255 else 255.0
        if img.mode == "F" and x.max(initial=0) <= 1.0:
            hi = 1.0
        img = Image.fromarray(np.clip(x / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


# portraits arriving as bytes (uploads, LiveKit dispatch metadata and URLs) are decoded no larger than this
# (longer side): enough to find a face in a group photo and crop it at the model's 512 px, without a
# 5000x5000 image costing gigabytes and a stall
PORTRAIT_MAX_SIDE = 2048


def image_from_bytes(data: bytes, max_side: int | None = None, max_pixels: int = MAX_PORTRAIT_PIXELS,
                     what: str = "image", min_side: int = 1) -> np.ndarray:
    """Decode an image (JPEG, PNG or WebP only; at most max_pixels, checked from the header) to RGB uint8;
    with `max_side`, no larger than about that (a 5000x5000 upload must not cost gigabytes: the models work
    at 512 px). Untrusted bytes are decoded in a separate process: see emo_stream.portrait_pool."""
    import io

    try:
        with _open_checked(io.BytesIO(data), data[:12], what, max_pixels) as img:
            if min(img.size) < min_side:
                raise ImageInputError(f"{what}: {img.size[0]}x{img.size[1]} is too small (at least {min_side} "
                                      f"pixels a side)")
            return _to_rgb(img, max_side)
    except ImageInputError:
        raise
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what}: the image is too large (limit {max_pixels} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"{what}: not a readable image ({exc.__class__.__name__})") from None


def to_mono_float(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Interleaved PCM (int16 or float) with `channels` channels -> mono float32 in [-1, 1]."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        x = pcm16_to_float(pcm)
    else:
        x = pcm.astype(np.float32, copy=False)
    if channels > 1:
        x = x[: len(x) - len(x) % channels].reshape(-1, channels).mean(axis=1)
    return x


def resample(x: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a mono float32 signal (polyphase, scipy)."""
    if from_rate == to_rate:
        return np.asarray(x, dtype=np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(from_rate), int(to_rate))
    return resample_poly(np.asarray(x, dtype=np.float32), to_rate // g, from_rate // g).astype(np.float32)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, min_seconds: float = 0.1) -> np.ndarray:
    """Decode any audio PyAV reads (wav, mp3, m4a, the audio of a video...) to mono float32 at `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"audio not found: {path}")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioInputError(f"no audio stream in {path}")
            stream = container.streams.audio[0]
            if stream.rate and stream.rate < MIN_INPUT_RATE:
                # e.g. a WAV header saying 7 Hz: taken at its word it is hours of audio to render
                raise AudioInputError(f"audio sample rate {stream.rate} Hz in {path} is implausible (corrupt "
                                      f"header?): re-encode it, e.g. to a 16 kHz WAV")
            # keep the channels through resampling and average them ourselves: FFmpeg's downmix
            # scales by -3 dB per channel, which would change the level of mono-in-stereo files
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sample_rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().mean(axis=0))
    except AudioInputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise AudioInputError(f"cannot decode audio {path} ({exc.__class__.__name__}): not an audio or video file "
                              f"FFmpeg can read; convert it to WAV or MP3") from None
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if len(audio) < min_seconds * sample_rate:
        raise AudioInputError(
            f"audio too short: {len(audio) / sample_rate:.2f} s in {path} (need at least {min_seconds} s)"
        )
    if not np.isfinite(audio).all():
        raise AudioInputError(f"audio has invalid samples (NaN/inf): {path}")
    return audio


VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
VIDEO_AVATAR_MAX_SECONDS = 10.0   # an idle loop of a few seconds is what a video avatar is for
VIDEO_AVATAR_MAX_SIDE = 1024      # frames are framed to the model size (512) later: decode no larger


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def load_video(path: str | Path, fps: int, max_seconds: float = VIDEO_AVATAR_MAX_SECONDS,
               max_side: int = VIDEO_AVATAR_MAX_SIDE) -> np.ndarray:
    """The first `max_seconds` of a video as RGB uint8 frames (T, H, W, 3), resampled to `fps` by time (the
    frame showing at each tick), the longer side at most `max_side`. One ImageInputError line for files
    that are not a readable video."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"video not found: {path}")
    frames: list[np.ndarray] = []
    limit = max(1, int(round(max_seconds * fps)))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageInputError(f"no video stream in {path}")
            stream = container.streams.video[0]
            tick, last = 0, None
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else tick / fps
                w, h = frame.width, frame.height
                scale = min(1.0, max_side / max(w, h))
                if scale < 1.0:
                    frame = frame.reformat(width=2 * round(w * scale / 2), height=2 * round(h * scale / 2))
                rgb = frame.to_ndarray(format="rgb24")
                while tick < limit and tick / fps < t:   # ticks before this frame show the previous one
                    if last is not None:
                        frames.append(last)
                    tick += 1
                last = rgb
                if tick >= limit:
                    break
            if last is not None and tick < limit:   # the last frame shows at the next tick
                frames.append(last)
    except ImageInputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise ImageInputError(f"cannot decode video {path} ({exc.__class__.__name__}): not a video FFmpeg can "
                              f"read") from None
    if not frames:
        raise ImageInputError(f"no frames in video {path}")
    return np.stack(frames)


class Mp4Writer:
    """Writes frames and audio to an MP4 as they arrive, so memory does not grow with duration.

    Video: H.264 (yuv420p). Audio: AAC, mono, 48 kHz (input at `sample_rate` is resampled; at 48 kHz
    the final AAC frame's padding stays under one video frame).
    """

    OUT_RATE = 48000

    def __init__(self, path: str | Path, fps: int, size: tuple[int, int] | int,
                 sample_rate: int = SAMPLE_RATE, crf: int = 20, audio: bool = True):
        width, height = (size, size) if isinstance(size, int) else size
        if width % 2 or height % 2:
            raise ValueError(f"H.264 (yuv420p) needs even frame sizes: got {width}x{height}")
        self.path = Path(path)
        self.fps = fps
        self.sample_rate = sample_rate
        self.frames_written = 0
        self.samples_written = 0  # at OUT_RATE
        # open the file ourselves: FFmpeg would only fail at the first frame (after all the set-up work)
        # with a traceback, and would pick the container from the suffix (none for "out" or "out.mp4/")
        # written under a hidden temporary name and renamed when complete: a killed run leaves no
        # truncated (0-byte) MP4 under the real name for a later step to trip over
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        if self.path.is_dir():
            raise OutputError(f"cannot write {self.path}: it is a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._partial, "wb")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc.__class__.__name__}") from None
        self._container = av.open(self._file, mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=Fraction(fps))
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._audio = None
        self._pending = np.zeros(0, np.float32)
        if audio:
            self._audio = self._container.add_stream("aac", rate=self.OUT_RATE)
            self._audio.layout = "mono"
            self._audio.format = "fltp"
            self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=self.OUT_RATE)
            self._in_samples = 0

    def write_frames(self, frames: np.ndarray) -> None:
        """frames: (T, H, W, 3) or (H, W, 3) uint8 RGB."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
            frame.pts = self.frames_written
            frame.time_base = Fraction(1, self.fps)
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """samples: mono float32 in [-1, 1] at the writer's sample rate."""
        if self._audio is None:
            return
        samples = np.asarray(samples, np.float32).reshape(-1)
        if not len(samples):
            return
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._in_samples
        frame.time_base = Fraction(1, self.sample_rate)
        self._in_samples += len(samples)
        self._push_resampled(self._resampler.resample(frame))

    def _push_resampled(self, frames) -> None:
        for f in frames:
            self._pending = np.concatenate([self._pending, f.to_ndarray().reshape(-1)])
        frame_size = self._audio.codec_context.frame_size or 1024
        while len(self._pending) >= frame_size:
            self._encode_audio(self._pending[:frame_size])
            self._pending = self._pending[frame_size:]

    def _encode_audio(self, chunk: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(chunk[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = self.OUT_RATE
        frame.pts = self.samples_written
        frame.time_base = Fraction(1, self.OUT_RATE)
        self.samples_written += len(chunk)
        self._container.mux(self._audio.encode(frame))

    def close(self) -> None:
        if self._container is None:
            return
        if self._audio is not None:
            self._push_resampled(self._resampler.resample(None))
            if len(self._pending):
                self._encode_audio(self._pending)
                self._pending = np.zeros(0, np.float32)
            self._container.mux(self._audio.encode(None))
        self._container.mux(self._video.encode(None))
        self._container.close()
        self._container = None
        self._file.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Give up: nothing is left under the output name (nor the temporary one)."""
        if self._container is None:
            return
        try:
            self._container.close()
        except Exception:  # a half-written container may not close cleanly; it is deleted anyway
            pass
        self._container = None
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def probe_durations(path: str | Path) -> dict:
    """Durations (seconds) and frame count of an MP4's streams, decoded, for tests and checks."""
    out: dict = {}
    with av.open(str(path)) as c:
        if c.streams.video:
            vs = c.streams.video[0]
            n = sum(1 for _ in c.decode(vs))
            out["frames"] = n
            out["fps"] = float(vs.average_rate) if vs.average_rate else None
            out["video_s"] = n / out["fps"] if out["fps"] else None
    with av.open(str(path)) as c:
        if c.streams.audio:
            samples, rate = 0, c.streams.audio[0].rate
            for f in c.decode(c.streams.audio[0]):
                samples += f.samples
            out["audio_s"] = samples / rate
            out["audio_rate"] = rate
    return out
