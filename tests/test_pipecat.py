"""The pipecat video service with pipecat's own frames and test runner (pipecat.tests.utils.run_test): TTS audio
in, avatar pictures with their audio out (in-process engine and a server over the WebSocket API), the first
speaking frame while the utterance is still arriving, interruption, and a server that goes away."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install -e \".[pipecat]\")")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from emo_stream.pipecat import EmoStreamVideoService, LocalAvatar, RemoteAvatar  # noqa: E402
from emo_stream.pipecat.video import METADATA_KEY  # noqa: E402

# one event loop for the module: the engine, its prepared portrait and the server are made once (preparing a
# portrait is the slow part on a small CPU)
pytestmark = pytest.mark.asyncio(loop_scope="module")
SIZE = 64
TTS_RATE = 24000   # what pipecat's TTS services usually produce
FPS = 25


@pytest.fixture(scope="module")
def backend():
    from emo_stream.registry import create_backend

    return create_backend("preview", size=SIZE)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(backend):
    from emo_stream.default_avatar import default_portrait
    from emo_stream.streaming import EngineConfig, StreamingEngine

    eng = StreamingEngine(backend, EngineConfig(segment_frames=2, vad=False))
    await eng.start()
    eng.test_avatar = await eng.prepare_avatar(default_portrait(256))
    yield eng
    await eng.stop()


def local(engine) -> LocalAvatar:
    return LocalAvatar(engine=engine, avatar=engine.test_avatar)


def tts(speech_16k: np.ndarray, seconds: float, realtime: bool = True) -> list:
    """The utterance as a TTS service sends it: started, 20 ms chunks of 24 kHz PCM16 (paced), stopped."""
    from scipy.signal import resample_poly

    x = resample_poly(speech_16k[:int(seconds * 16000)], 3, 2)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    step = TTS_RATE // 50
    frames: list = [TTSStartedFrame()]
    for i in range(0, len(pcm), step):
        frames.append(TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=TTS_RATE, num_channels=1))
        if realtime:
            frames.append(SleepFrame(sleep=0.02))
    frames.append(TTSStoppedFrame())
    return frames


class Timeline(BaseObserver):
    """When each frame left the source (the test's input) and the service (its output)."""

    def __init__(self, service):
        super().__init__()
        self.service = service
        self.events: list[tuple[float, str, object]] = []

    async def on_push_frame(self, data: FramePushed):
        who = "service" if data.source is self.service else type(data.source).__name__
        self.events.append((time.monotonic(), who, data.frame))

    def first(self, who: str, pred) -> float | None:
        return next((t for t, w, f in self.events if w == who and pred(f)), None)

    def last(self, who: str, pred) -> float | None:
        return next((t for t, w, f in reversed(self.events) if w == who and pred(f)), None)


def speech_image(frame) -> bool:
    return isinstance(frame, OutputImageRawFrame) and frame.metadata.get(METADATA_KEY, {}).get("speech", False)


def idle_image(frame) -> bool:
    return isinstance(frame, OutputImageRawFrame) and not frame.metadata.get(METADATA_KEY, {}).get("speech", True)


def check_utterance(down: list, seconds: float) -> None:
    """Pictures of the avatar with their audio: idle before (listening), speech images each followed by the
    16 kHz audio they cover, TTSStoppedFrame after the last of it, idle again after."""
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    assert images and all(f.size == (SIZE, SIZE) and f.format == "RGB" and len(f.image) == SIZE * SIZE * 3
                          and f.sync_with_audio for f in images)
    speech = [i for i, f in enumerate(down) if speech_image(f)]
    assert speech, "no speaking frames"
    assert any(idle_image(f) for f in down[:speech[0]]), "no idle (listening) frames before the speech"
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert all(f.sample_rate == 16000 and f.num_channels == 1 for f in audio)   # the avatar's audio, not the TTS's
    for i in speech:   # each speaking picture is followed by exactly the audio it covers
        follower = down[i + 1]
        assert isinstance(follower, TTSAudioRawFrame)
        assert follower.metadata[METADATA_KEY]["index"] == down[i].metadata[METADATA_KEY]["index"]
    played = sum(len(f.audio) // 2 for f in audio) / 16000
    assert abs(played - seconds) <= 3 / FPS, (played, seconds)   # whole frames: the tail is padded
    stop = next(i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame))
    assert stop > speech[-1] and down[speech[-1]].metadata[METADATA_KEY]["segment_end"]
    assert any(idle_image(f) for f in down[stop:]), "the avatar did not go back to idle"


async def test_local_engine_speaks_the_tts_audio_in_sync(engine, speech_16k):
    service = EmoStreamVideoService(avatar=local(engine))
    timeline = Timeline(service)
    seconds = 1.6
    frames = [SleepFrame(sleep=0.3)] + tts(speech_16k, seconds) + [SleepFrame(sleep=1.0)]
    down, up = await run_test(service, frames_to_send=frames, observers=[timeline], start_timeout=10)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    check_utterance(down, seconds)
    # the first speaking frame comes while the utterance is still arriving (streaming, not after the TTS ends)
    first_in = timeline.first("QueuedFrameProcessor", lambda f: isinstance(f, TTSAudioRawFrame))
    last_in = timeline.last("QueuedFrameProcessor", lambda f: isinstance(f, TTSAudioRawFrame))
    first_out = timeline.first("service", speech_image)
    assert first_in < first_out < last_in, (first_out - first_in, last_in - first_in)
    print(f"first speaking frame {1000 * (first_out - first_in):.0f} ms after the first TTS audio "
          f"(utterance {seconds} s, preview backend, this CPU)")


async def test_interruption_stops_the_speaking_picture_within_100_ms(engine, speech_16k):
    service = EmoStreamVideoService(avatar=local(engine))
    timeline = Timeline(service)
    frames = tts(speech_16k, 3.0, realtime=False)[:-1] + [SleepFrame(sleep=0.4), InterruptionFrame(),
                                                          SleepFrame(sleep=0.8)]
    down, up = await run_test(service, frames_to_send=frames, observers=[timeline], start_timeout=10)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert any(speech_image(f) for f in down[:cut]), "the interruption came before any speech"
    after = [f for f in down[cut:] if speech_image(f)]
    # at most the frame being pushed when the interrupt arrived: < 100 ms of video (2.5 frames at 25 fps)
    assert len(after) <= 2, f"{len(after)} speaking frames after the interruption"
    assert sum(isinstance(f, OutputImageRawFrame) for f in down[cut:]) >= 10   # idle frames go on
    assert not any(isinstance(f, TTSStoppedFrame) for f in down[cut:])        # the utterance never finished


async def _server(backend):
    from server.app import StreamServer
    from server.config import load_config

    cfg = load_config(None, port=0, size=SIZE, backend="preview")
    cfg.engine.vad = False
    srv = StreamServer(cfg, backend=backend)
    await srv.start()
    return srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend):
    srv = await _server(backend)
    yield srv
    await srv.stop()


async def test_remote_server_over_the_websocket_api(server, speech_16k):
    service = EmoStreamVideoService(avatar=RemoteAvatar(server.base_url))
    seconds = 1.2
    frames = [SleepFrame(sleep=0.3)] + tts(speech_16k, seconds) + [SleepFrame(sleep=1.5)]
    down, up = await run_test(service, frames_to_send=frames, start_timeout=10)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    check_utterance(down, seconds)


async def test_a_server_that_goes_away_is_an_error_frame(backend, speech_16k):
    server = await _server(backend)
    service = EmoStreamVideoService(avatar=RemoteAvatar(server.base_url))

    async def pull_the_plug():
        while not len(server.sessions):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        await server.stop()

    plug = asyncio.create_task(pull_the_plug())
    frames = [SleepFrame(sleep=1.0)] + tts(speech_16k, 0.4) + [SleepFrame(sleep=1.0)]
    down, up = await run_test(service, frames_to_send=frames, start_timeout=10)
    await plug
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "emo-stream" in errors[0].error, [e.error for e in errors]
    assert any(isinstance(f, TTSStoppedFrame) for f in down)   # held stop frames are not lost


async def test_an_unreachable_server_is_an_error_frame():
    service = EmoStreamVideoService(avatar=RemoteAvatar("http://127.0.0.1:9", open_timeout=2))
    down, up = await run_test(service, frames_to_send=[SleepFrame(sleep=0.2)], start_timeout=10)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "cannot connect" in errors[0].error
    assert not [f for f in down if isinstance(f, OutputImageRawFrame)]
