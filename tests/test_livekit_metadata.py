"""The LiveKit dispatch metadata and the package's import boundary; no livekit package needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from emo_stream.errors import ConfigError, ImageInputError
from emo_stream.livekit.metadata import DispatchInfo, decode_image, encode_image, fetch_image


def test_dispatch_metadata_round_trip_and_errors():
    info = DispatchInfo(avatar_identity="emo-stream-1", sender_identity="agent-x", image_url="https://e/x.png",
                        seed=3, sample_rate=48000)
    back = DispatchInfo.from_json(info.to_json())
    assert back == info
    assert back.image_key() == "url:https://e/x.png"
    assert DispatchInfo.from_json('{"avatar_identity": "a", "future_field": 1}').extra == {"future_field": 1}
    for bad, word in [("", "avatar_identity"), ("[1]", "object"), ("{", "JSON"),
                      ('{"avatar_identity": "a", "mode": "sing"}', "mode"),
                      ('{"avatar_identity": "a", "sample_rate": 1000}', "sample_rate"),
                      ('{"avatar_identity": "a", "seed": "x"}', "seed"),
                      ('{"v": 2, "avatar_identity": "a"}', "version")]:
        with pytest.raises(ConfigError, match=word):
            DispatchInfo.from_json(bad)


def test_portrait_travels_in_the_metadata_downscaled():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (900, 600, 3), dtype=np.uint8)
    b64 = encode_image(image)                       # noise: the worst case for JPEG
    assert len(b64) <= 256 * 1024
    back = decode_image(b64)
    assert back.shape == (384, 256, 3)
    with pytest.raises(ImageInputError, match="base64"):
        decode_image("not base64!")
    with pytest.raises(ImageInputError, match="http"):
        fetch_image("file:///etc/passwd")


def test_emo_stream_imports_without_livekit():
    code = ("import sys; sys.modules['livekit'] = None\n"
            "import emo_stream, emo_stream.livekit as lk\n"
            "from emo_stream.livekit.metadata import DispatchInfo\n"
            "try:\n    lk.AvatarSession\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install" in out.stdout and "emo-stream[livekit]" in out.stdout


def test_dispatch_portraits_are_decoded_with_the_upload_size_bound():
    """A huge image in the metadata (or at a URL) must not cost gigabytes: the same bound as uploads."""
    import base64
    import io

    from PIL import Image

    from emo_stream.media import PORTRAIT_MAX_SIDE

    buf = io.BytesIO()
    Image.new("1", (5000, 3000), 1).save(buf, format="PNG")   # a few KB on the wire
    image = decode_image(base64.b64encode(buf.getvalue()).decode("ascii"))
    assert max(image.shape[:2]) <= PORTRAIT_MAX_SIDE and image.shape[2] == 3
