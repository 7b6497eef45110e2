"""Real-browser test helpers: Debian chromium under Playwright with a fake microphone, and the preview
`serve` process its pages talk to (tests/test_browser_e2e.py, tests/test_whip_clients.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from server.serve_process import start_serve_process, stop_serve_process
from tests.conftest import REPO

CHROMIUM = "/usr/bin/chromium"


@contextmanager
def chromium_with_fake_mic(mic_wav: Path) -> Iterator:
    """A launched Chromium whose microphone plays `mic_wav` (a 48 kHz WAV) and grants it without a prompt;
    skips the test where chromium or playwright is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def preview_server(env: dict[str, str] | None = None, timeout: float = 90.0) -> Iterator[str]:
    """`serve` on loopback in its own process (preview backend, 128 px frames): its base URL."""
    proc, url = start_serve_process(["--host", "127.0.0.1", "--port", "0", "--size", "128", "--backend", "preview"],
                                    repo=REPO, env=env, timeout=timeout)
    try:
        yield url
    finally:
        stop_serve_process(proc)
