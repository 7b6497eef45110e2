"""The two ways the pipecat service reaches an avatar: a local streaming engine, or an emo-stream server.

Both have the same small surface (no pipecat import here):

    await avatar.open()
    await avatar.push_audio(pcm16_bytes)       # 16 kHz mono PCM16
    await avatar.end_of_speech()               # the utterance is complete
    await avatar.clear()                       # interrupt: queued speech is dropped
    async for frame in avatar.frames(): ...    # AvatarFrame: picture + the 16 kHz audio it covers, in order
    await avatar.close()

`LocalAvatar` runs emo_stream.streaming in this process (GPU here). `RemoteAvatar` speaks the server's
WebSocket bot API (/api/ws, docs/ws_api.md: PCM16 in; binary frames of JSON header + JPEG + PCM16 out), so
the GPU can be on another machine. Failures surface as `AvatarLinkError` from frames() or the calls.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from emo_stream.errors import EmoStreamError
from emo_stream.pcm import float_to_pcm16
from emo_stream.server_url import bot_api_url
from emo_stream.timeline import SAMPLE_RATE

log = logging.getLogger(__name__)

IMAGE_MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png", b"RIFF": "image/webp"}


class AvatarLinkError(EmoStreamError):
    """The avatar cannot be reached or stopped working (server gone, refused, engine failure)."""


@dataclass
class AvatarFrame:
    index: int             # position on the session's timeline (25 fps by default)
    image: np.ndarray      # (H, W, 3) uint8 RGB
    audio: np.ndarray      # float32 16 kHz mono: exactly the audio this frame covers (silence when idle)
    speech: bool
    segment_end: bool      # the last frame of an utterance


def pcm16(audio: np.ndarray) -> bytes:
    return float_to_pcm16(audio).tobytes()


# -- in-process ------------------------------------------------------------------------------------

class LocalAvatar:
    """One session of a streaming engine in this process.

    Give a started `engine` (shared by several agents: they batch together), or a backend name and let
    open() build and start an engine for this avatar alone (it is stopped by close()):

        LocalAvatar(engine=engine, image=rgb)
        LocalAvatar(engine=engine, avatar=await engine.prepare_avatar(rgb))   # prepared once, many agents
        LocalAvatar(backend="echomimic", model="/models/echomimic", image="me.jpg", size=512)
    """

    def __init__(self, *, engine: Any = None, image: np.ndarray | str | Path | None = None,
                 backend: str | None = None, model: str | None = None, size: int = 512,
                 device: str | None = None, seed: int = 0, engine_config: Any = None, avatar: Any = None):
        self._engine = engine
        self._avatar = avatar
        self._owns_engine = engine is None
        self._image = image
        self._backend_name, self._model, self._size, self._device = backend, model, size, device
        self._engine_config = engine_config
        self._seed = seed
        self._session: Any = None
        self.fps = 25

    async def open(self) -> None:
        from emo_stream.streaming import StreamingEngine

        if self._engine is None:
            from emo_stream.registry import create_backend

            backend = await asyncio.to_thread(create_backend, self._backend_name, self._model, size=self._size,
                                              device=self._device)
            self._engine = StreamingEngine(backend, self._engine_config)
            await self._engine.start()
        avatar = self._avatar
        if avatar is None:
            image = await asyncio.to_thread(self._load_image)
            avatar = await self._engine.prepare_avatar(image)
        self._session = self._engine.open_session(avatar, seed=self._seed)
        self.fps = int(self._engine.fps)

    def _load_image(self) -> np.ndarray:
        if isinstance(self._image, np.ndarray):
            return self._image
        if self._image is not None:
            from emo_stream.media import load_image

            return load_image(self._image)
        from emo_stream.default_avatar import default_portrait

        return default_portrait(max(int(self._engine.frame_size), 256))

    async def push_audio(self, pcm: bytes) -> None:
        try:
            await self._session.push_audio(np.frombuffer(pcm, "<i2"), sample_rate=SAMPLE_RATE, channels=1)
        except EmoStreamError as exc:
            raise AvatarLinkError(f"the avatar session stopped: {exc}") from exc

    async def end_of_speech(self) -> None:
        self._session.end_of_speech()

    async def clear(self) -> None:
        self._session.clear()

    async def frames(self) -> AsyncIterator[AvatarFrame]:
        try:
            async for f in self._session.frames():
                yield AvatarFrame(f.index, f.image, np.asarray(f.audio, np.float32), bool(f.speech),
                                  bool(f.segment_end))
        except EmoStreamError as exc:
            raise AvatarLinkError(f"the avatar engine failed: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._owns_engine and self._engine is not None:
            await self._engine.stop()
            self._engine = None


# -- over the WebSocket API --------------------------------------------------------------------------

class RemoteAvatar:
    """A session on an emo-stream server, over its WebSocket bot API.

    `avatar`: a portrait to upload (path or image bytes), or None for the server's own. Frames come back
    as JPEG (quality `jpeg_quality`) with their 16 kHz audio, paced in real time by the server.
    """

    INBOX_FRAMES = 50   # two seconds of frames read ahead of the pipeline; more means it stopped reading

    def __init__(self, url: str, *, token: str | None = None, avatar: str | Path | bytes | None = None,
                 jpeg_quality: int = 85, seed: int = 0, open_timeout: float = 10.0, ssl: Any = None):
        self.url = bot_api_url(url, AvatarLinkError)
        self._token = token
        self._avatar = avatar
        self._quality = jpeg_quality
        self._seed = seed
        self._open_timeout = open_timeout
        self._ssl = ssl
        self._ws: Any = None
        self._inbox: asyncio.Queue = asyncio.Queue(self.INBOX_FRAMES)
        self._replies: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._clearing = 0        # clears sent whose "cleared" has not come back: speech before it is stale
        self._closing = False
        self.session: str | None = None
        self.fps = 25

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        extra = {"ssl": self._ssl} if self._ssl is not None and self.url.startswith("wss:") else {}
        try:
            self._ws = await connect(self.url, additional_headers=headers, max_size=16 * 1024 * 1024,
                                     compression=None, open_timeout=self._open_timeout, **extra)
        except Exception as exc:   # refused, DNS, HTTP 401/403 from the handshake, timeout
            raise AvatarLinkError(f"cannot connect to the emo-stream server at {self.url}: {exc}") from None
        self._reader = asyncio.create_task(self._read(), name="emo-stream-reader")
        avatar_id = None
        if self._avatar is not None:
            data = self._avatar if isinstance(self._avatar, bytes) else Path(self._avatar).read_bytes()
            content_type = next((t for magic, t in IMAGE_MAGIC.items() if data.startswith(magic)), None)
            if content_type is None:
                raise AvatarLinkError("the avatar is not a JPEG, PNG or WebP image")
            await self._send_json({"type": "avatar", "content_type": content_type, "size": len(data)})
            await self._ws.send(data)
            avatar_id = (await self._reply("avatar_ready", timeout=120))["avatar"]
        start: dict[str, Any] = {"type": "start", "audio": {"format": "pcm16", "sample_rate": SAMPLE_RATE,
                                                            "channels": 1},
                                 "frames": "jpeg", "jpeg_quality": self._quality, "seed": self._seed}
        if avatar_id:
            start["avatar"] = avatar_id
        await self._send_json(start)
        started = await self._reply("session_started", timeout=30)
        self.session, self.fps = started["session"], int(started.get("fps", 25))

    async def _send_json(self, message: dict) -> None:
        await self._send(json.dumps(message))

    async def _send(self, data: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise AvatarLinkError("not connected to the emo-stream server")
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise AvatarLinkError(f"the emo-stream server at {self.url} went away ({exc})") from None

    async def _reply(self, kind: str, timeout: float) -> dict:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    msg = await self._replies.get()
                    if msg is None:
                        raise AvatarLinkError(f"the emo-stream server at {self.url} closed the connection")
                    if msg.get("type") == "error":
                        raise AvatarLinkError(f"the emo-stream server refused: {msg.get('message')}")
                    if msg.get("type") == kind:
                        return msg
        except TimeoutError:
            raise AvatarLinkError(f"no {kind} from the emo-stream server within {timeout:g} s") from None

    async def push_audio(self, pcm: bytes) -> None:
        await self._send(pcm)

    async def end_of_speech(self) -> None:
        await self._send_json({"type": "end_of_segment"})

    async def clear(self) -> None:
        self._clearing += 1
        self._drop_queued_speech()
        await self._send_json({"type": "clear"})

    def _drop_queued_speech(self) -> None:
        kept = []
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if not (isinstance(item, AvatarFrame) and item.speech):
                kept.append(item)
        for item in kept:
            self._inbox.put_nowait(item)

    async def frames(self) -> AsyncIterator[AvatarFrame]:
        while True:
            item = await self._inbox.get()
            if isinstance(item, AvatarFrame):
                yield item
            elif item is None:
                return
            else:
                raise item

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        failure: Exception | None = None
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    frame = await asyncio.to_thread(decode_frame, message)
                    if frame.speech and self._clearing:
                        continue   # rendered before our clear reached the server
                    await self._inbox.put(frame)
                    continue
                msg = json.loads(message)
                kind = msg.get("type")
                if kind == "cleared":
                    self._clearing = max(0, self._clearing - 1)
                elif kind == "session_ended":
                    failure = AvatarLinkError(f"the emo-stream server ended the session ({msg.get('reason')})")
                    break
                elif kind == "error" and msg.get("fatal"):
                    failure = AvatarLinkError(f"the emo-stream server failed: {msg.get('message')}")
                    break
                elif kind == "error" and not msg.get("request"):
                    log.warning("emo-stream server: %s", msg.get("message"))
                else:
                    self._replies.put_nowait(msg)
        except ConnectionClosed as exc:
            failure = AvatarLinkError(f"the emo-stream server at {self.url} went away ({exc})")
        except Exception as exc:
            failure = AvatarLinkError(f"reading from the emo-stream server failed: {exc!r}")
        else:
            if failure is None:
                failure = AvatarLinkError(f"the emo-stream server at {self.url} closed the connection")
        finally:
            self._replies.put_nowait(None)
        if self._closing:
            failure = None
        while self._inbox.full():   # the end must get in even if nobody is reading
            self._inbox.get_nowait()
        self._inbox.put_nowait(failure)

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            try:
                await self._ws.send(json.dumps({"type": "stop"}))
            except Exception:
                pass
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


_HEADER_LEN = struct.Struct(">I")


def decode_frame(data: bytes) -> AvatarFrame:
    """One binary frame message of the bot API: 4-byte big-endian N | N bytes JSON header | JPEG | PCM16."""
    from PIL import Image

    if len(data) < 4:
        raise AvatarLinkError("frame message too short")
    (n,) = _HEADER_LEN.unpack_from(data)
    header = json.loads(data[4:4 + n])
    start = 4 + n
    jpeg = data[start:start + header["jpeg_bytes"]]
    pcm = data[start + header["jpeg_bytes"]:start + header["jpeg_bytes"] + header["audio_bytes"]]
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767.0
    return AvatarFrame(int(header["index"]), image, audio, bool(header["speech"]), bool(header["segment_end"]))
