"""What an agent tells the avatar worker in the dispatch metadata (JSON), and reading the portrait it names.

    {"v": 1, "mode": "agent", "avatar_identity": "emo-stream-...", "sender_identity": "agent-AJ_x",
     "image_url": "https://...", "seed": 0, "sample_rate": 24000}

`image_url` (http/https), `image_b64` (a JPEG/PNG, base64) or `avatar` (a name the worker was started
with, `--avatar NAME=PATH`) picks the portrait; none of them: the worker's default portrait.
No livekit import here: the agent side and the worker share it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from emo_stream.errors import ConfigError, ImageInputError

VERSION = 1
MODES = ("agent", "talk")
MAX_IMAGE_BYTES = 20 * 1024 * 1024       # a portrait fetched from a URL
METADATA_IMAGE_SIDE = 384                # a local portrait is sent downscaled to this (keeps metadata small)
MAX_METADATA_IMAGE_BYTES = 256 * 1024    # its base64 JPEG at most this (the server's metadata cap is 512 KiB)
DEFAULT_SAMPLE_RATE = 24000              # the agent's TTS audio is sent to the worker at this rate


@dataclass
class DispatchInfo:
    """The avatar job's parameters, carried in the LiveKit dispatch metadata."""

    avatar_identity: str
    mode: str = "agent"                  # agent: the agent's TTS over the data stream; talk: a mic
    sender_identity: str | None = None   # agent (or talking participant) identity; None: the first one
    image_url: str | None = None
    image_b64: str | None = None
    avatar: str | None = None
    seed: int = 0
    sample_rate: int = DEFAULT_SAMPLE_RATE
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = {"v": VERSION, **{k: v for k, v in asdict(self).items() if v not in (None, {})}}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "DispatchInfo":
        try:
            d = json.loads(text or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"dispatch metadata is not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ConfigError("dispatch metadata must be a JSON object")
        if d.pop("v", VERSION) != VERSION:
            raise ConfigError(f"dispatch metadata version must be {VERSION}")
        known = {k: d.pop(k) for k in list(d) if k in cls.__dataclass_fields__ and k != "extra"}
        if not isinstance(known.get("avatar_identity"), str) or not known["avatar_identity"]:
            raise ConfigError("dispatch metadata needs avatar_identity (the identity the avatar joins with)")
        info = cls(**known, extra=d)
        if info.mode not in MODES:
            raise ConfigError(f"dispatch metadata mode must be one of {', '.join(MODES)}: got {info.mode!r}")
        if not isinstance(info.seed, int):
            raise ConfigError("dispatch metadata seed must be an integer")
        if not isinstance(info.sample_rate, int) or not 8000 <= info.sample_rate <= 48000:
            raise ConfigError("dispatch metadata sample_rate must be an integer 8000..48000")
        return info

    def image_key(self) -> str | None:
        """What identifies the portrait (for the worker's once-per-worker preparation cache)."""
        if self.image_b64:
            return "b64:" + hashlib.sha256(self.image_b64.encode()).hexdigest()
        if self.image_url:
            return "url:" + self.image_url
        if self.avatar:
            return "name:" + self.avatar
        return None


def encode_image(image: np.ndarray, side: int = METADATA_IMAGE_SIDE) -> str:
    """RGB uint8 -> base64 JPEG no larger than `side` pixels and MAX_METADATA_IMAGE_BYTES (LiveKit caps
    dispatch metadata, 512 KiB by default): the quality drops until it fits."""
    from PIL import Image

    img = Image.fromarray(image)
    img.thumbnail((side, side))
    for quality in (90, 80, 65, 50, 35):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        encoded = base64.b64encode(buf.getvalue()).decode("ascii")
        if len(encoded) <= MAX_METADATA_IMAGE_BYTES:
            return encoded
    raise ImageInputError("the portrait does not fit in the dispatch metadata even at low JPEG quality: "
                          "pass an http(s) URL the worker can download instead")


def portrait_from_bytes(data: bytes, what: str, pool=None) -> np.ndarray:
    """The one decode policy (emo_stream.media: JPEG/PNG/WebP, pixels bounded from the header, at most
    PORTRAIT_MAX_SIDE), in `pool`'s worker processes when given (an emo_stream.portrait_pool.PortraitPool:
    the worker's, so one job's image cannot starve the other rooms)."""
    from emo_stream.media import PORTRAIT_MAX_SIDE, image_from_bytes

    if pool is not None:
        return pool.decode(data, what=what).image
    return image_from_bytes(data, PORTRAIT_MAX_SIDE, what=what)


def decode_image(b64: str, pool=None) -> np.ndarray:
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("dispatch metadata image_b64 is not valid base64") from None
    return portrait_from_bytes(data, "dispatch metadata image_b64", pool)


def fetch_image(url: str, policy=None, pool=None) -> np.ndarray:
    """Download a portrait under `policy` (emo_stream.livekit.url_fetch.UrlPolicy; default: public
    addresses only, 20 s and MAX_IMAGE_BYTES for the whole download) and decode it (in `pool` when given)."""
    from emo_stream.livekit.url_fetch import UrlPolicy, fetch

    data = fetch(url, policy or UrlPolicy(max_bytes=MAX_IMAGE_BYTES))
    return portrait_from_bytes(data, "the avatar image URL", pool)
