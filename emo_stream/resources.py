"""Where the project's top-level data folders (configs/, client_web/) are, however it was installed."""

from __future__ import annotations

import sys
from pathlib import Path


def resource_dir(name: str) -> Path:
    """`name` from the source checkout (editable install, tests), else from a wheel install, which puts
    these folders under <prefix>/share/emo-stream (pyproject's data-files). Callers report missing files."""
    checkout = Path(__file__).resolve().parents[1] / name
    if checkout.is_dir():
        return checkout
    installed = Path(sys.prefix) / "share" / "emo-stream" / name
    return installed if installed.is_dir() else checkout
