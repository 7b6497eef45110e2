"""A pipecat voice agent with an emo-stream face, in the browser over pipecat's own WebRTC transport.

The agent (speech-to-text, an LLM, text-to-speech) runs here; EmoStreamVideoService after the TTS turns
its speech into the avatar's pictures and lip-synced audio, which the transport plays to the user.
The avatar is rendered either by an `emo-stream serve` on a GPU machine (EMO_SERVER set) or in this
process (EMO_BACKEND, default the CPU preview animator).

    pip install "emo-stream[pipecat]" "pipecat-ai[webrtc,runner,silero]==1.14.0"
    export OPENAI_API_KEY=...
    emo-stream serve --host 0.0.0.0 --model /models/musetalk &      # on the GPU machine (prints its token)
    EMO_SERVER=http://gpu-box:8080 EMO_TOKEN=... python examples/pipecat_agent.py
    # open http://localhost:7860/client and talk

EMO_AVATAR: a portrait to use (a path on this machine); unset: the server's (or the built-in) portrait.
Any pipecat STT / LLM / TTS service works; OpenAI is used here because one key covers all three.
"""

from __future__ import annotations

import os

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.transports.base_transport import TransportParams

from emo_stream.pipecat import EmoStreamVideoService, LocalAvatar, RemoteAvatar

SIZE = int(os.environ.get("EMO_SIZE", "512"))


def make_avatar():
    portrait = os.environ.get("EMO_AVATAR")
    if os.environ.get("EMO_SERVER"):   # the GPU is elsewhere: the server's WebSocket API
        return RemoteAvatar(os.environ["EMO_SERVER"], token=os.environ.get("EMO_TOKEN"), avatar=portrait)
    return LocalAvatar(backend=os.environ.get("EMO_BACKEND", "preview"), model=os.environ.get("EMO_MODEL"),
                       image=portrait, size=SIZE)


async def bot(runner_args: RunnerArguments) -> None:
    transport = await create_transport(runner_args, {
        "webrtc": lambda: TransportParams(
            audio_in_enabled=True, audio_out_enabled=True,
            video_out_enabled=True, video_out_width=SIZE, video_out_height=SIZE, video_out_framerate=25),
    })
    context = LLMContext([{"role": "system", "content": "You are a friendly assistant with a face. Keep answers "
                                                         "short: they are spoken."}])
    aggregators = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))
    pipeline = Pipeline([
        transport.input(),
        OpenAISTTService(api_key=os.environ["OPENAI_API_KEY"]),
        aggregators.user(),
        OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"], model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini")),
        OpenAITTSService(api_key=os.environ["OPENAI_API_KEY"], voice=os.environ.get("OPENAI_VOICE", "alloy")),
        EmoStreamVideoService(avatar=make_avatar()),   # TTS audio in; avatar pictures + their audio out
        transport.output(),
        aggregators.assistant(),
    ])
    task = PipelineTask(pipeline, params=PipelineParams(audio_out_sample_rate=24000))

    @transport.event_handler("on_client_disconnected")
    async def _gone(transport, client) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=runner_args.handle_sigint).run(task)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
