"""SIGTERM of a Hallo server while a bot streams and closes its session: the process exits 0, without C++'s
"terminate called without an active exception" (SIGABRT). That abort came from interpreter shutdown while an
engine stage thread (daemon) was still inside a torch call: stop() waited 10 s for it and then let the
process finalise under it. Here engine.stop_join_s is 0, so SIGTERM always lands with the generator mid-call
(CPU Hallo is slower than real time), the path that aborted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _download_layout(golden: Path, root: Path) -> Path:
    """A Hallo download folder (hallo/net.pth, wav2vec2, VAE, UNet config) from a golden set's weights."""
    import torch
    from diffusers import AutoencoderKL

    case = json.loads((golden / "case.json").read_text())
    (root / "hallo").mkdir(parents=True)
    (root / "hallo" / "net.pth").symlink_to(golden / "weights" / "net.pth")
    (root / "wav2vec").mkdir()
    (root / "wav2vec" / "wav2vec2-base-960h").symlink_to(golden / "weights" / "wav2vec2-base-960h")
    unet = root / "stable-diffusion-v1-5" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(case["unet_2d_config"]))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[32] * 4, layers_per_block=1, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  latent_channels=4, sample_size=64).save_pretrained(str(root / "sd-vae-ft-mse"))
    return root


async def _stream_then_sigterm(proc: subprocess.Popen, url: str) -> int:
    from server.bot_client import BotClient

    t = np.arange(16000 * 4) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    bot = BotClient(url)
    await bot.connect()
    await bot.start(sample_rate=16000)
    for i in range(0, len(pcm), 3200):
        await bot.send_audio(pcm[i:i + 3200])
    frames = 0
    async for item in bot.receive(timeout=300):
        if not isinstance(item, dict):
            frames += 1
            if frames >= 2:
                break
    closing = asyncio.create_task(bot.close())     # the session closes as the signal arrives
    proc.send_signal(signal.SIGTERM)
    await asyncio.gather(closing, return_exceptions=True)
    return frames


@pytest.mark.timeout(900)   # a server start with a model load: ~30 s on a quiet box, minutes on a shared one
def test_sigterm_while_a_bot_session_closes_exits_cleanly(hallo_set, tmp_path):
    model = _download_layout(hallo_set, tmp_path / "pretrained_models")
    cfg = tmp_path / "server.yaml"
    cfg.write_text("engine:\n  stop_join_s: 0\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", "0", "--size", "64",
                             "--backend", "hallo", "--model", str(model), "--config", str(cfg), "--steps", "4"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, t0 = None, time.monotonic()
        while url is None and time.monotonic() - t0 < 600:
            line = proc.stdout.readline()
            if not line:
                break
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
        assert url, proc.stderr.read()[-2000:] if proc.poll() is not None else "no URL within 600 s"
        frames = asyncio.run(_stream_then_sigterm(proc, url))
        assert frames >= 2
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "terminate called" not in err, err[-2000:]
    assert proc.returncode == 0, err[-2000:]
