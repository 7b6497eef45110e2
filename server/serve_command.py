"""`emo-stream serve`: run the streaming server until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; other addresses need a token)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8080; 0 picks a free one)")
    add_model_arguments(parser)
    parser.add_argument("--avatar", default=None, help="default portrait image, or for musetalk a short idle video "
                                                       "(default: a built-in portrait)")
    parser.add_argument("--config", default=None, help="server settings YAML (default configs/server.yaml)")
    parser.add_argument("--size", type=int, default=None, help="output frame size in pixels")
    parser.add_argument("--device", default=None,
                        help="torch device for the model backends "
                             "(default: cuda if available, else cpu)")
    add_sampling_arguments(parser)
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="concurrent sessions (default from config; empty there: what the GPU's memory holds "
                             "and its compute sustains, 4 on a CPU)")
    add_calibrate_argument(parser)
    parser.add_argument("--segment-frames", type=int, default=None,
                        help="frames generated per step: lower is less latency, higher is more context/throughput")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve https/wss (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    parser.add_argument("--token-file", default=None,
                        help="file holding the master token for pages and API (or $EMO_STREAM_TOKEN; at least "
                             "128 bits, e.g. 22 random characters; default: none on loopback, generated beyond)")
    parser.add_argument("--viewer-token-file", default=None,
                        help="file holding the token of the OBS viewer URL, which opens that page only "
                             "(or $EMO_STREAM_VIEWER_TOKEN; default: derived from the master token)")
    parser.add_argument("--token", default=None,
                        help="the master token on the command line: other users see it in the process list; "
                             "prefer --token-file or $EMO_STREAM_TOKEN")
    parser.add_argument("--virtual-camera", action="store_true",
                        help="also send the latest session's video to a virtual camera (pyvirtualcam)")


def add_model_arguments(parser) -> None:
    """--backend/--model: which family animates and with what weights (serve and worker)."""
    from emo_stream.registry import family_names

    parser.add_argument("--backend", choices=family_names(), default=None,
                        help="animation backend (default: the one that runs --model's family: emo, echomimic "
                             "or hallo; without --model, preview)")
    parser.add_argument("--model", default=None,
                        help="model: an EchoMimic or Hallo download folder, an emo-stream checkpoint folder "
                             "(emo-stream train / convert), or a preset (tiny, sd15)")


def add_sampling_arguments(parser) -> None:
    """--steps/--guidance/--decoder/--weights for the live model (serve and worker; generate has its own)."""
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps per segment (default: the model's; EchoMimic acc 6, normal 30)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (1 = none, the live default; default: the model's)")
    parser.add_argument("--decoder", choices=["vae", "taesd"], default=None,
                        help="latent decoder (default: the model's)")
    parser.add_argument("--weights", "--weights-set", dest="weights", choices=["acc", "normal"], default=None,
                        help="EchoMimic: which weights set of a folder holding both (default: acc)")


def add_calibrate_argument(parser) -> None:
    parser.add_argument("--calibrate", choices=["auto", "on", "off", "refresh"], default=None,
                        help="without --max-sessions, time the model's live step at start for the capacity: auto "
                             "(on CUDA; cached per device and setup), on (also on a CPU), off (memory only), "
                             "refresh (not from the cache) (default from config: auto)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("steps", "guidance", "decoder", "weights")}


def apply_engine_flags(config, args: argparse.Namespace) -> None:
    """--max-sessions, --calibrate and --segment-frames, where given, over the config file's values (serve and
    worker)."""
    if args.max_sessions is not None:
        config.sessions.max_sessions = args.max_sessions
    if getattr(args, "calibrate", None) is not None:
        config.sessions.calibrate = args.calibrate
    if args.segment_frames is not None:
        config.engine.segment_frames = args.segment_frames


def run(args: argparse.Namespace) -> int:
    from server.config import load_config

    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
        logging.getLogger("aioice").setLevel(logging.WARNING)

    from server.auth import read_secret

    token = read_secret(flag=args.token, flag_name="--token", file=args.token_file, file_flag="--token-file",
                        env="EMO_STREAM_TOKEN", what="token")
    viewer_token = read_secret(flag=None, flag_name="", file=args.viewer_token_file,
                               file_flag="--viewer-token-file", env="EMO_STREAM_VIEWER_TOKEN", what="viewer token")
    config = load_config(args.config, host=args.host, port=args.port, backend=args.backend, model=args.model,
                         avatar=args.avatar, size=args.size, device=args.device, token=token,
                         viewer_token=viewer_token,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, **sampling_overrides(args))
    apply_engine_flags(config, args)
    config.validate()   # the flags above get the same checks as the config file
    holder: list = []
    try:
        rc = asyncio.run(_serve(config, args.virtual_camera, holder))
    except Exception:
        # stopping failed; with a stage thread still in a model call a normal exit would abort (below)
        if not (holder and getattr(holder[0].engine, "unfinished_threads", [])):
            raise
        log.exception("stopping the server failed")
        rc = 1
    unfinished = getattr(holder[0].engine, "unfinished_threads", []) if holder else []
    if unfinished:
        # A stage thread is still inside the model (a long denoising step). Interpreter shutdown under a
        # thread that runs torch code aborts in C++ ("terminate called without an active exception",
        # SIGABRT): every session and socket is closed by now, so end the process without the shutdown.
        log.warning("exiting while %s finishes a model call", ", ".join(t.name for t in unfinished))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


async def _serve(config, virtual_camera: bool, holder: list | None = None) -> int:
    from server.allocator import fix_mmap_threshold
    from server.app import StreamServer

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:   # the user's own setting wins
        fix_mmap_threshold()
    server = StreamServer(config, virtual_camera=virtual_camera)
    if holder is not None:
        holder.append(server)
    await server.start()
    server.avatars.pool.warm()   # the upload decoder's process starts now, not with the first upload
    # what startup made (modules, the model, caches) lives as long as the server: out of the collector's walks,
    # so the full pass after sessions close (server.sessions.collect_soon) costs milliseconds
    gc.collect()
    gc.freeze()
    from server.diagnostics import Diagnostics

    diagnostics = Diagnostics.from_env(server)   # $EMO_STREAM_DIAGNOSTICS: memory/pause records (debugging only)
    if diagnostics is not None:
        diagnostics.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    print(f"emo-stream serving on {server.url}  (backend {server.backend_name}; OBS viewer: "
          f"{server.viewer_url('latest')}; health: {server.base_url}/healthz)", flush=True)
    if not config.loopback:
        hint = "" if config.tls else (" Browsers only allow the microphone on https:// or localhost: use "
                                      "--tls-cert/--tls-key or an HTTPS reverse proxy for remote use.")
        print(f"  bound to {config.host}: pages and API need the token shown in the URL above.{hint}",
              file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        if diagnostics is not None:
            await diagnostics.stop()
        await server.stop()
    return 0
