"""bench/gpu_suite.sh, the one GPU command, cannot rot: its --cpu-try runs every step at tiny sizes on the CPU
and writes the same JSON (device named, every step's status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(2500)
def test_cpu_try_runs_every_step_and_names_the_device(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", "bench/gpu_suite.sh", "--cpu-try"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=2480)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["cpu_try"] and suite["device"].startswith("cpu")
    assert [s["step"] for s in suite["steps"]] == ["emo-live", "echomimic-live", "musetalk-live"]
    assert all(s["rc"] == 0 for s in suite["steps"])
    for family in ("emo", "echomimic", "musetalk"):
        [path] = tmp_path.glob(f"gpu_live-cpu-{family}-*.json")
        res = json.loads(path.read_text())
        assert res["complete"] and res["device"].startswith("cpu") and res["family"] == family
        assert [r["sessions"] for r in res["runs"]] == [1, 2] and all(r["aggregate_fps"] > 0 for r in res["runs"])
        assert res["first_frame_ms"] > 0 and res["offline"]["compute_seconds_per_video_second"] > 0
