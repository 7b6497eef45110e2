"""`emo-stream worker`: join LiveKit as an avatar worker for LiveKit Agents (one process per GPU).

    LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... emo-stream worker --backend emo --model CKPT

See docs/livekit.md. Needs the livekit extra: pip install "emo-stream[livekit]".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from emo_stream.errors import ConfigError
from server.serve_command import (add_calibrate_argument, add_model_arguments, add_sampling_arguments,
                                  apply_engine_flags, sampling_overrides)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    lk = parser.add_argument_group("LiveKit")
    lk.add_argument("--url", default=None, help="LiveKit server URL, wss://... (default $LIVEKIT_URL)")
    lk.add_argument("--api-key", default=None, help="API key (default $LIVEKIT_API_KEY)")
    lk.add_argument("--api-secret-file", default=None, help="file holding the API secret (or $LIVEKIT_API_SECRET)")
    lk.add_argument("--api-secret", default=None,
                    help="API secret on the command line: other users see it in the process list; prefer "
                         "--api-secret-file or $LIVEKIT_API_SECRET")
    lk.add_argument("--agent-name", default="emo-stream",
                    help="name the worker registers under; AvatarSession(agent_name=...) dispatches it "
                         "(default emo-stream)")
    lk.add_argument("--drain-timeout", type=int, default=1800,
                    help="seconds current rooms may go on after SIGTERM (default 1800)")
    lk.add_argument("--http-port", type=int, default=8081,
                    help="livekit-agents' health endpoint port (default 8081; 0: any free port)")
    lk.add_argument("--http-host", default="127.0.0.1",
                    help="address of that health endpoint (default 127.0.0.1; 0.0.0.0 for a remote probe)")
    lk.add_argument("--max-retry", type=int, default=16,
                    help="failed attempts to reach the LiveKit server before the worker gives up and exits; "
                         "the waits between them grow to 10 s (default 16; 0: give up at the first failure)")
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--device", default=None,
                       help="torch device for the model backends, e.g. cuda:1 "
                            "(default: cuda if available, else cpu)")
    model.add_argument("--size", type=int, default=None, help="output frame size in pixels")
    model.add_argument("--config", default=None, help="server settings YAML for engine settings "
                                                      "(default configs/server.yaml)")
    add_sampling_arguments(model)
    model.add_argument("--max-sessions", type=int, default=None,
                       help="rooms this worker serves at once (its capacity; default from config; empty there: "
                            "what the GPU's memory holds and its compute sustains, 4 on a CPU)")
    add_calibrate_argument(model)
    model.add_argument("--segment-frames", type=int, default=None, help="frames generated per step")
    av = parser.add_argument_group("portraits")
    av.add_argument("--default-avatar", default=None,
                    help="portrait for dispatches that name none (default: a built-in portrait)")
    av.add_argument("--avatar", action="append", default=[], metavar="NAME=PATH",
                    help="a portrait agents can pick by name (AvatarSession(worker_avatar=NAME)); repeatable")
    av.add_argument("--image-host", action="append", default=[], metavar="HOST",
                    help="the only hosts image_url may name (.example.com: its subdomains); repeatable "
                         "(default: any host with a public address)")
    av.add_argument("--image-network", action="append", default=[], metavar="CIDR",
                    help="a private network image_url may reach anyway, e.g. an image server on 10.1.2.0/24; "
                         "repeatable (default: public addresses only)")


def _named_avatars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--avatar wants NAME=PATH: got {item!r}")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    from server.auth import read_secret

    secret = read_secret(flag=args.api_secret, flag_name="--api-secret", file=args.api_secret_file,
                         file_flag="--api-secret-file", env="LIVEKIT_API_SECRET", what="API secret")
    if args.drain_timeout < 0:
        raise ConfigError("--drain-timeout must be >= 0")
    try:
        import livekit.agents  # noqa: F401
    except ImportError:
        raise ConfigError('emo-stream worker needs the livekit packages: pip install "emo-stream[livekit]"') \
            from None
    from emo_stream.livekit.worker import WorkerConfig
    from server.config import load_config

    url = args.url or os.environ.get("LIVEKIT_URL")
    key = args.api_key or os.environ.get("LIVEKIT_API_KEY")
    missing = [name for name, value in (("--url / LIVEKIT_URL", url), ("--api-key / LIVEKIT_API_KEY", key),
                                        ("--api-secret / LIVEKIT_API_SECRET", secret)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: the LiveKit server to join and its API key")
    if args.max_sessions is not None and args.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
    if args.segment_frames is not None and not 1 <= args.segment_frames <= 64:
        raise ConfigError("--segment-frames must be 1..64")
    config = load_config(args.config, backend=args.backend, model=args.model, size=args.size, device=args.device,
                         **sampling_overrides(args))
    apply_engine_flags(config, args)
    worker_config = WorkerConfig(url=url, api_key=key, api_secret=secret, agent_name=args.agent_name,
                                 default_avatar=args.default_avatar, avatars=_named_avatars(args.avatar),
                                 drain_timeout=args.drain_timeout, http_port=args.http_port,
                                 http_host=args.http_host, image_hosts=tuple(args.image_host),
                                 image_networks=tuple(args.image_network), max_retry=args.max_retry).validate()
    return asyncio.run(_serve(config, worker_config))


async def _serve(config, worker_config) -> int:
    from emo_stream.livekit.host import EngineHost
    from emo_stream.livekit.worker import AvatarWorker
    from emo_stream.streaming import MonotonicClock
    from server.app import build_engine

    host = EngineHost(build_engine(config, MonotonicClock()))
    worker = AvatarWorker(host, worker_config)
    await host.start()
    try:
        print(f"emo-stream worker: {worker_config.agent_name!r} on {worker_config.url}, backend "
              f"{host.engine.backend.name}, {host.capacity} rooms at most", flush=True)
        await worker.serve()
    finally:
        await host.stop()
    return 0
