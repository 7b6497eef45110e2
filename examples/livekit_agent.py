"""A LiveKit voice agent with an emo-stream face.

The agent (speech-to-text, an LLM, text-to-speech) runs here; the face is rendered by an
`emo-stream worker` running on a GPU machine and joining the same LiveKit server. AvatarSession
dispatches that worker into the agent's room and sends it the agent's speech; the worker publishes the
lip-synced video and the speech into the room.

    pip install "emo-stream[livekit]" "livekit-agents[openai,silero]==1.8.9"
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... OPENAI_API_KEY=...
    emo-stream worker &                                   # on each GPU machine (see docs/livekit.md)
    python examples/livekit_agent.py dev                  # then join the room, e.g. https://agents-playground.livekit.io

EMO_AVATAR picks the portrait: a path on this machine, or an http(s) URL the worker downloads
(unset: the worker's default portrait). Any STT / LLM / TTS plugin works; OpenAI is used here because
one key covers all three.
"""

from __future__ import annotations

import logging
import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli
from livekit.plugins import openai, silero

from emo_stream.livekit import AvatarSession

logging.basicConfig(level=logging.INFO)

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        vad=silero.VAD.load(),
        stt=openai.STT(),
        llm=openai.LLM(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini")),
        tts=openai.TTS(voice=os.environ.get("OPENAI_VOICE", "alloy")),
    )
    # before session.start: the agent's audio goes to the avatar worker, not straight into the room
    avatar = AvatarSession(avatar=os.environ.get("EMO_AVATAR") or None,
                           agent_name=os.environ.get("EMO_AGENT_NAME", "emo-stream"))
    await avatar.start(session, room=ctx.room)
    await session.start(
        agent=Agent(instructions="You are a friendly assistant with a face. Keep answers short and spoken."),
        room=ctx.room,
    )
    await session.generate_reply(instructions="Greet the user in one sentence.")


if __name__ == "__main__":
    cli.run_app(server)
