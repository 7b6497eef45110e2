"""The `emo-stream` command. Each subcommand's module owns its arguments (add_arguments) and work (run)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module with add_arguments(parser) and run(args) -> int; imported only when used
COMMANDS = {
    "serve": ("server.serve_command", "run the streaming server (talk page, OBS viewer, WebSocket API)"),
    "generate": ("emo_stream.generate", "render a portrait + audio file to an MP4 offline"),
    "worker": ("server.worker_command", "join LiveKit as an avatar worker for LiveKit Agents (one per GPU)"),
    "bot": ("server.bot_client", "stream an audio file through a server's WebSocket API and record the reply"),
    "prepare": ("emo_stream.training.prepare", "turn a folder of talking-head videos into a training set"),
    "train": ("emo_stream.training.train", "train EMO stage 1, 2 or 3, or distill a few-step live student"),
    "parity": ("emo_stream.parity", "replay a golden set (case.json + reference weights) and report max abs errors"),
    "convert": ("emo_stream.convert", "convert a downloaded model folder (EchoMimic, Hallo) to our checkpoint"),
}


class _HelpWithDefaults(argparse.HelpFormatter):
    """Options show their default unless the help already says it (or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS   # (0 is a default worth showing: no `in (False, ...)`)
        if not action.option_strings or "default" in text or nothing or action.help == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (the others may pull in torch or aiortc)."""
    parser = argparse.ArgumentParser(prog="emo-stream", description="EMO talking-avatar generation and streaming")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpWithDefaults)
        p.set_defaults(_module=module)
        if name == command:
            _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    from emo_stream.errors import EmoStreamError

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(_load(args._module).run(args) or 0)
    except EmoStreamError as exc:
        print(f"emo-stream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
