"""`emo-stream serve` in a child process, for benchmarks and end-to-end tests that need a real server apart
from themselves (its own CPU and memory, its own signals, another checkout's code): start it, wait for the
"emo-stream serving on http://..." line that serve_command prints, stop it.

    proc, url = start_serve_process(["--port", "0", "--backend", "preview"], repo=REPO)
    try:
        ...   # BotClient(url), pages at url + "/"
    finally:
        stop_serve_process(proc)
"""

from __future__ import annotations

import collections
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from emo_stream.errors import EmoStreamError

SERVING_URL = re.compile(r"http://[0-9.:]+")


class ServerDidNotStart(EmoStreamError):
    """`serve` exited or printed no URL in time; the message ends with its last lines of output."""


def start_serve_process(args: list[str], *, repo: str | Path, env: dict[str, str] | None = None,
                        timeout: float = 120.0, entry: tuple[str, ...] = ("-m", "server.cli")
                        ) -> tuple[subprocess.Popen, str]:
    """Run `python -m server.cli serve *args` with the code of the checkout `repo` (cwd and PYTHONPATH) and
    `env` added to this process's environment; (process, base URL) once it prints its URL. `entry` replaces
    `-m server.cli` (a bench's launcher that registers its own backend first, say)."""
    proc = subprocess.Popen([sys.executable, *entry, "serve", *args], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo), **(env or {})})
    # a thread reads its output (and keeps draining it, so the pipe never fills and blocks the server): a
    # server silent before its URL line must not block this wait past `timeout`
    lines: queue.Queue[str | None] = queue.Queue()
    url_found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if not url_found.is_set():
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    last_lines: collections.deque[str] = collections.deque(maxlen=40)
    deadline, output_ended = time.monotonic() + timeout, False
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            output_ended = True
            break
        last_lines.append(line)
        found = SERVING_URL.search(line)
        if found and "serving" in line:
            url_found.set()
            return proc, found.group(0)
    try:   # its output ended: it is exiting, give it a moment to say how
        exit_code = proc.wait(10) if output_ended else None
    except subprocess.TimeoutExpired:
        exit_code = None
    proc.kill()
    proc.wait()
    why = f"exit code {exit_code}" if exit_code is not None else f"no URL within {timeout:g} s"
    raise ServerDidNotStart(f"the server in {repo} did not start ({why}):\n" + "".join(last_lines))


def stop_serve_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM (the server closes its sessions), SIGKILL if it has not exited within `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
