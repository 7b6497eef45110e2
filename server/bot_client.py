"""Python client for the WebSocket bot API (/api/ws), and `emo-stream bot`, which streams an audio file
through a server and records what comes back (video + its audio) to an MP4.

    async with BotClient("ws://127.0.0.1:8080/api/ws") as bot:
        info = await bot.start(sample_rate=16000, frames="jpeg")
        await bot.send_audio(pcm16)            # int16 array or bytes; waits under backpressure
        await bot.end_segment()
        async for item in bot.receive():       # dict events and ReceivedFrame objects, in order
            ...

See docs/ws_api.md for the protocol itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from emo_stream.errors import EmoStreamError

from emo_stream.pcm import float_to_pcm16
from emo_stream.server_url import bot_api_url
from emo_stream.timeline import SAMPLE_RATE
from server import protocol
from server.auth import RedactingLogger
from server.protocol import decode_frame

log = logging.getLogger(__name__)

REPLIES = {"start": protocol.SESSION_STARTED, "avatar": protocol.AVATAR_READY, "stats": protocol.STATS,
           "view": protocol.VIEW_STARTED, "clear": protocol.CLEARED, "ping": protocol.PONG}


class BotError(EmoStreamError):
    """The server answered a request with an error event (code in .code)."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


@dataclass
class ReceivedFrame:
    index: int             # position on the session's playout timeline
    pts: float             # seconds
    image: np.ndarray      # (H, W, 3) uint8 RGB, decoded from JPEG
    audio: np.ndarray      # float32 16 kHz mono: exactly the audio this frame covers
    speech: bool
    segment_end: bool
    jpeg: bytes | None = None  # the frame as sent, when the client was made with decode=False (image is None)
    received_at: float = 0.0   # time.monotonic() when its message came off the socket (receive() may hand it
                               # out later, when the caller reads slower than frames arrive)


class BotClient:
    """One connection, one session at a time. Replies to requests are matched by type; everything else
    (events, frames) is queued for receive() in arrival order (bounded: a bot that stops reading
    makes the server drop frames, never events)."""

    def __init__(self, url: str, token: str | None = None, inbox: int = 256, decode: bool = True,
                 ssl: Any = None):
        self.url = bot_api_url(url)
        self.decode = decode
        self.ssl = ssl  # an ssl.SSLContext for wss:// with a private CA or self-signed certificate
        self.token = token
        self.ws: ClientConnection | None = None
        self.session: dict | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(inbox)
        self._waiters: list[tuple[str, str, asyncio.Future]] = []
        self._reader: asyncio.Task | None = None
        self._closed_reason: str | None = None

    async def __aenter__(self) -> "BotClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            extra = {"ssl": self.ssl} if self.ssl is not None and self.url.startswith("wss:") else {}
            self.ws = await connect(self.url, additional_headers=headers, max_size=16 * 1024 * 1024,
                                    compression=None, open_timeout=10, **extra,
                                    logger=RedactingLogger(logging.getLogger("websockets.client"),
                                                           lambda: (self.token,)))
        except OSError as exc:
            raise BotError(f"cannot connect to {self.url}: {exc}", "connect") from None
        except Exception as exc:  # HTTP 401/403 and other handshake refusals
            raise BotError(f"cannot connect to {self.url}: {exc}", "connect") from None
        self._reader = asyncio.create_task(self._read(), name="bot-reader")

    async def close(self) -> None:
        if self._reader is not None and self._inbox.full():
            self._reader.cancel()  # blocked on the full inbox of a caller that stopped receiving
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # -- requests ----------------------------------------------------------------------------------
    async def request(self, message: dict, timeout: float = 30.0) -> dict:
        """Send a JSON message and wait for its reply (or raise BotError with the server's message)."""
        kind = message["type"]
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (REPLIES[kind], kind, fut)
        self._waiters.append(entry)
        try:
            await self.send_json(message)
            return await asyncio.wait_for(fut, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def send_json(self, message: dict) -> None:
        if self.ws is None:
            raise BotError("not connected", "bad_state")
        await self.ws.send(json.dumps(message))

    async def upload_avatar(self, data: bytes, content_type: str = "image/jpeg") -> str:
        kind = REPLIES["avatar"]
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (kind, "avatar", fut)
        self._waiters.append(entry)
        try:
            await self.send_json({"type": "avatar", "content_type": content_type, "size": len(data)})
            await self.ws.send(data)
            reply = await asyncio.wait_for(fut, 120)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return reply["avatar"]

    async def start(self, sample_rate: int = SAMPLE_RATE, channels: int = 1, avatar: str | None = None,
                    frames: str = "jpeg", jpeg_quality: int = 80, seed: int = 0,
                    stats_interval: float | None = None) -> dict:
        msg: dict[str, Any] = {"type": "start", "audio": {"format": "pcm16", "sample_rate": sample_rate,
                                                          "channels": channels},
                               "frames": frames, "jpeg_quality": jpeg_quality, "seed": seed}
        if avatar:
            msg["avatar"] = avatar
        if stats_interval:
            msg["stats_interval"] = stats_interval
        self.session = await self.request(msg)
        return self.session

    async def send_audio(self, pcm: np.ndarray | bytes) -> None:
        """PCM16 little-endian interleaved (an int16 array, a float array in [-1, 1], or raw bytes)."""
        if isinstance(pcm, np.ndarray):
            if pcm.dtype != np.int16:
                pcm = float_to_pcm16(pcm)
            pcm = pcm.astype("<i2").tobytes()
        await self.ws.send(pcm)

    async def end_segment(self) -> None:
        await self.send_json({"type": "end_of_segment"})

    async def clear(self) -> None:
        await self.send_json({"type": "clear"})

    async def stats(self) -> dict:
        return await self.request({"type": "stats"})

    async def stop(self) -> None:
        await self.send_json({"type": "stop"})
        self.session = None

    # -- receiving ---------------------------------------------------------------------------------
    async def receive(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """Events (dicts) and ReceivedFrame objects in order, until the connection closes."""
        while True:
            try:
                item = await asyncio.wait_for(self._inbox.get(), timeout)
            except asyncio.TimeoutError:
                raise BotError(f"nothing received for {timeout} s", "timeout") from None
            if item is None:
                return
            yield item

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    at = time.monotonic()
                    frame = await asyncio.to_thread(_decode, message) if self.decode else _decode(message, False)
                    frame.received_at = at
                    await self._inbox.put(frame)
                    continue
                msg = json.loads(message)
                if self._deliver_reply(msg):
                    continue
                await self._inbox.put(msg)
        except ConnectionClosed as exc:
            self._closed_reason = str(exc)
        finally:
            for _, _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(BotError(f"connection closed ({self._closed_reason or 'by the server'})",
                                               "closed"))
            if self._inbox.full():  # the end mark must get in even if nobody is receiving
                self._inbox.get_nowait()
            self._inbox.put_nowait(None)

    def _deliver_reply(self, msg: dict) -> bool:
        for entry in self._waiters:
            reply_type, request, fut = entry
            if fut.done():
                continue
            if msg.get("type") == reply_type:
                fut.set_result(msg)
                self._waiters.remove(entry)
                return True
            if msg.get("type") == protocol.ERROR and msg.get("request") == request:
                fut.set_exception(BotError(msg.get("message", "error"), msg.get("code", "error")))
                self._waiters.remove(entry)
                return True
        return False


def _decode(data: bytes, image: bool = True) -> ReceivedFrame:
    from PIL import Image

    header, jpeg, pcm = decode_frame(data)
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) if image else None
    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0
    return ReceivedFrame(index=header["index"], pts=header["pts"], image=rgb, audio=audio,
                         speech=header["speech"], segment_end=header["segment_end"], jpeg=None if image else jpeg)


# -- `emo-stream bot` ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--audio", required=True, help="speech or song to stream (any format PyAV reads)")
    parser.add_argument("--out", required=True, help="MP4 to write with the avatar's video and audio")
    parser.add_argument("--avatar", default=None, help="portrait to upload (default: the server's)")
    parser.add_argument("--token-file", default=None,
                        help="file holding the server's token (or $EMO_STREAM_TOKEN; servers beyond loopback)")
    parser.add_argument("--token", default=None,
                        help="the token on the command line: other users see it in the process list; prefer "
                             "--token-file or $EMO_STREAM_TOKEN")
    parser.add_argument("--chunk-ms", type=int, default=200, help="audio message size in milliseconds")
    parser.add_argument("--realtime", action="store_true", help="send audio at real-time pace (default: as fast "
                        "as the server accepts it)")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up when nothing arrives for this long")


def run(args: argparse.Namespace) -> int:
    from emo_stream.media import load_audio
    from server.auth import read_secret

    token = read_secret(flag=args.token, flag_name="--token", file=args.token_file, file_flag="--token-file",
                        env="EMO_STREAM_TOKEN", what="token")
    audio = load_audio(args.audio, sample_rate=SAMPLE_RATE)
    if args.avatar and not Path(args.avatar).is_file():
        raise EmoStreamError(f"avatar not found: {args.avatar}")
    avatar = Path(args.avatar).read_bytes() if args.avatar else None
    if avatar is not None and _content_type(avatar) is None:
        raise EmoStreamError(f"avatar {args.avatar} is not an image: give a JPEG, PNG or WebP portrait")
    from emo_stream.generate import check_writable

    check_writable(args.out)
    summary = asyncio.run(stream_file(args.url, audio, args.out, token=token, avatar=avatar,
                                      chunk_ms=args.chunk_ms, realtime=args.realtime, timeout=args.timeout))
    print(json.dumps(summary))
    return 0


async def stream_file(url: str, audio: np.ndarray, out: str | Path, *, token: str | None = None,
                      avatar: bytes | None = None, chunk_ms: int = 200, realtime: bool = False,
                      timeout: float = 30.0) -> dict:
    """Send 16 kHz mono float audio as one segment; write the frames of its playback to `out`."""
    from emo_stream.media import Mp4Writer

    if not 10 <= chunk_ms <= 2000:
        raise EmoStreamError("--chunk-ms must be 10..2000")
    pcm = float_to_pcm16(audio)
    step = 16 * chunk_ms
    async with BotClient(url, token) as bot:
        avatar_id = None
        if avatar is not None:
            avatar_id = await bot.upload_avatar(avatar, _content_type(avatar) or "image/jpeg")
        info = await bot.start(sample_rate=SAMPLE_RATE, avatar=avatar_id, frames="jpeg")

        async def sender() -> None:
            for i in range(0, len(pcm), step):
                await bot.send_audio(pcm[i:i + step])
                if realtime:
                    await asyncio.sleep(chunk_ms / 1000)
            await bot.end_segment()

        send_task = asyncio.create_task(sender())
        writer = None
        frames = speech_frames = 0
        finished: dict | None = None
        try:
            async for item in bot.receive(timeout=timeout):
                if isinstance(item, ReceivedFrame):
                    if not item.speech:
                        continue  # idle frames before the speech reaches playback
                    if writer is None:
                        h, w = item.image.shape[:2]
                        writer = Mp4Writer(out, fps=info["fps"], size=(w, h))
                    writer.write_frames(item.image)
                    writer.write_audio(item.audio)
                    speech_frames += 1
                    frames += 1
                elif item.get("type") == protocol.PLAYBACK_FINISHED:
                    finished = item
                    break
                elif item.get("type") == protocol.ERROR:
                    raise BotError(item.get("message", "error"), item.get("code", "error"))
        finally:
            send_task.cancel()
            await asyncio.gather(send_task, return_exceptions=True)
            if writer is not None:
                writer.close()
        await bot.stop()
    if writer is None:
        raise BotError("the server sent no speech frames", "empty")
    return {"out": str(out), "session": info["session"], "frames": frames, "seconds": round(frames / info["fps"], 3),
            "input_seconds": round(len(audio) / SAMPLE_RATE, 3), "finished": finished}


def _content_type(data: bytes) -> str | None:
    """The upload type by the file's magic bytes (None: not an image the server takes)."""
    for content_type, magics in protocol.IMAGE_TYPES.items():
        if any(data.startswith(m) for m in magics) and (content_type != "image/webp" or data[8:12] == b"WEBP"):
            return content_type
    return None
