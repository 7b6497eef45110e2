"""The compute side of serve / worker's default capacity (emo_stream.streaming.capacity): a start-up calibration
times the backend's live step; here a fake backend's step advances a fake clock by a known time, so the
arithmetic is exact and nothing depends on this machine's speed. Then the cache, the CUDA minimum with the
memory-based count (CUDA faked), the server's flags and its one log line (a real CPU backend, synctest)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from emo_stream.backend import AudioContext
from emo_stream.errors import ConfigError
from emo_stream.streaming.capacity import (Calibration, CalibrationCache, batch_sizes, calibrate,
                                           calibration_key, default_capacity)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TimedBackend:
    """A step costs `fixed` + `per_session` x sessions seconds of the fake clock (generate), plus `encode` a
    session (encode_audio); counts its calls."""

    name = "timed"
    fps = 25
    size = 64
    audio_context = AudioContext(left_samples=320, lookahead_frames=2)

    def __init__(self, clock: FakeClock, fixed: float = 0.010, per_session: float = 0.005, encode: float = 0.001):
        self.clock, self.fixed, self.per_session, self.encode = clock, fixed, per_session, encode
        self.calls = {"encode": 0, "generate": 0, "states": 0}
        self.batches: list[int] = []

    def prepare_avatar(self, image):
        return "avatar"

    def new_state(self, avatar, seed=0):
        self.calls["states"] += 1
        return {"seed": seed}

    def encode_audio(self, audio, start, num_frames):
        # the window the engine would hand it: left context, the segment and its look-ahead
        assert start == 320 and len(audio) == 320 + (num_frames + 2) * 640
        self.calls["encode"] += 1
        self.clock.t += self.encode
        return np.zeros(num_frames)

    def generate(self, jobs):
        self.calls["generate"] += 1
        self.batches.append(len(jobs))
        self.clock.t += self.fixed + self.per_session * len(jobs)
        return [np.zeros((j.num_frames, 8, 8, 3), np.uint8) for j in jobs]


class SplitBackend(TimedBackend):
    """denoise + decode and one encode_audio_batch call for all sessions, as the engine calls them."""

    def encode_audio_batch(self, requests):
        self.calls["encode"] += 1
        self.clock.t += self.encode * len(requests)
        return [np.zeros(n) for _, _, n in requests]

    def denoise(self, jobs):
        self.batches.append(len(jobs))
        self.clock.t += self.fixed + self.per_session * len(jobs)
        return ["latent"] * len(jobs)

    def decode(self, jobs, latents):
        self.calls["generate"] += 1
        return [np.zeros((j.num_frames, 8, 8, 3), np.uint8) for j in jobs]


def test_batch_sizes_are_the_engine_buckets_up_to_max_batch():
    assert batch_sizes(1) == (1,) and batch_sizes(4) == (1, 2, 4) and batch_sizes(6) == (1, 2, 4, 6)


@pytest.mark.parametrize("kind", [TimedBackend, SplitBackend])
def test_calibration_times_warm_steps_and_counts_the_sessions_real_time_allows(kind):
    clock = FakeClock()
    backend = kind(clock)
    synced = []
    cal = calibrate(backend, "avatar", segment_frames=8, max_batch=4, warmup=2, repeats=3, clock=clock,
                    synchronize=lambda: synced.append(clock.t))
    # t(b) = 10 ms + 5 ms x b + 1 ms of encoding a session
    assert cal.step_s == pytest.approx({1: 0.016, 2: 0.022, 4: 0.034})
    assert backend.batches == [1] * 5 + [2] * 5 + [4] * 5          # 2 warm-up + 3 timed steps per batch size
    assert backend.calls["generate"] == 15 and backend.calls["states"] == 1 + 2 + 4
    assert backend.calls["encode"] == (15 if kind is SplitBackend else 5 + 10 + 20)   # batched: one call a step
    assert len(synced) == 30                                        # before and after every step
    assert cal.step_seconds(3) == pytest.approx(0.028)              # linear between measured sizes
    assert cal.step_seconds(8) == pytest.approx(0.068)              # beyond them: no batching gain assumed
    # 8 frames at 25 fps = 320 ms a segment, 80% of it = 256 ms: 7 batches of 4 (238 ms) + 1 session (16 ms)
    assert cal.round_seconds(29) == pytest.approx(0.254) and cal.round_seconds(30) == pytest.approx(0.260)
    assert cal.sessions() == 29
    assert cal.sessions(headroom=1.0) == 36                         # 320 ms: 9 x 34 = 306 (36), + 16 > 320
    assert cal.sessions(limit=10) == 10
    assert cal.fps == 25 and cal.family == "timed" and cal.segment_frames == 8


def test_a_device_too_slow_for_one_session_stops_after_batch_1_and_still_serves_one(tmp_path):
    clock = FakeClock()
    backend = TimedBackend(clock, fixed=0.300)         # 306 ms for 1 session: more than 80% of 320 ms
    cal = calibrate(backend, "avatar", segment_frames=8, max_batch=4, clock=clock)
    assert sorted(cal.step_s) == [1] and cal.planned == (1, 2, 4) and cal.sessions() == 0
    assert "for 1 session takes 306 ms" in cal.describe() and "batches of 2/4 not timed" in cal.describe()
    n, why = default_capacity(TimedBackend(clock, fixed=0.300), segment_frames=8, max_batch=4, mode="on",
                              avatar=lambda: "avatar", cache=CalibrationCache(tmp_path / "c.json"), clock=clock)
    assert n == 1 and "not even one session keeps real time" in why


def test_a_step_twice_over_real_time_is_timed_once():
    clock = FakeClock()
    backend = TimedBackend(clock, fixed=1.0)           # 1.006 s against 256 ms: a slow family's start-up
    cal = calibrate(backend, "avatar", segment_frames=8, max_batch=4, clock=clock)
    assert backend.batches == [1, 1, 1] and cal.step_s == pytest.approx({1: 1.006})   # 2 warm-up + 1 timed


def test_the_time_budget_stops_adding_batch_sizes_and_extrapolates():
    clock = FakeClock()
    backend = TimedBackend(clock, fixed=2.0, per_session=0.0, encode=0.0)   # 2 s a step, 25 fps, 100 frames
    cal = calibrate(backend, "avatar", segment_frames=100, max_batch=4, warmup=1, repeats=1, budget_s=5.0,
                    clock=clock)
    assert sorted(cal.step_s) == [1, 2]                # 8 s spent after batch 2: batch 4 is not run
    assert cal.step_seconds(4) == pytest.approx(4.0)   # 2 s for 2 sessions -> 4 s for 4 (an overestimate)


def test_the_calibration_is_cached_per_device_family_and_setup(tmp_path, caplog):
    clock = FakeClock()
    cache = CalibrationCache(tmp_path / "sub" / "capacity.json")
    first = TimedBackend(clock)
    args = dict(segment_frames=8, max_batch=4, mode="on", avatar=lambda: "avatar", cache=cache, clock=clock,
                config={"model": "m1"})
    n, why = default_capacity(first, **args)
    assert n == 29 and first.calls["generate"] == 15 and "calibrated in" in why and str(cache.path) in why
    saved = json.loads(cache.path.read_text())
    [entry] = saved["entries"].values()
    assert entry["key"]["family"] == "timed" and entry["key"]["config"]["model"] == "m1"
    assert entry["key"]["torch"].startswith(torch.__version__) and entry["key"]["device"].startswith("cpu")
    # a restart with the same setup times nothing
    again = TimedBackend(clock)
    n2, why2 = default_capacity(again, **args)
    assert n2 == 29 and again.calls["generate"] == 0 and "cached from" in why2
    # another setup (segment length, model) is calibrated anew; refresh ignores the cache
    other = TimedBackend(clock)
    assert default_capacity(other, **{**args, "segment_frames": 4})[0] != 29 and other.calls["generate"] > 0
    other = TimedBackend(clock)
    default_capacity(other, **{**args, "config": {"model": "m2"}})
    assert other.calls["generate"] > 0
    fresh = TimedBackend(clock)
    assert default_capacity(fresh, **{**args, "mode": "refresh"})[0] == 29 and fresh.calls["generate"] == 15
    assert len(json.loads(cache.path.read_text())["entries"]) == 3
    # a damaged file is an empty cache, warned about, and rewritten
    cache.path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        damaged = TimedBackend(clock)
        assert default_capacity(damaged, **args)[0] == 29 and damaged.calls["generate"] == 15
    assert "unreadable" in caplog.text and len(json.loads(cache.path.read_text())["entries"]) == 1


def test_an_unwritable_cache_still_gives_the_calibration(tmp_path, caplog):
    clock = FakeClock()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        n, _ = default_capacity(TimedBackend(clock), segment_frames=8, max_batch=4, mode="on", avatar=lambda: "a",
                                cache=CalibrationCache(blocker / "capacity.json"), clock=clock)
    assert n == 29 and "not cached" in caplog.text


def test_off_cuda_the_default_stays_4_unless_a_calibration_is_asked_for(tmp_path):
    clock = FakeClock()
    cache = CalibrationCache(tmp_path / "c.json")
    for mode in ("auto", "off"):
        backend = TimedBackend(clock)
        n, why = default_capacity(backend, segment_frames=8, max_batch=4, mode=mode, avatar=lambda: "a",
                                  cache=cache, clock=clock)
        assert n == 4 and backend.calls["generate"] == 0 and not cache.path.exists()
        assert why.startswith("4 (the default: cpu)")
    with pytest.raises(ConfigError, match="calibrate must be one of auto, on, off, refresh"):
        default_capacity(TimedBackend(clock), segment_frames=8, max_batch=4, mode="sometimes")


def test_a_failed_calibration_leaves_the_memory_count(tmp_path, caplog):
    class Broken(TimedBackend):
        def generate(self, jobs):
            raise RuntimeError("CUDA error: an illegal memory access")

    clock = FakeClock()
    with caplog.at_level(logging.WARNING):
        n, why = default_capacity(Broken(clock), segment_frames=8, max_batch=4, mode="on", avatar=lambda: "a",
                                  cache=CalibrationCache(tmp_path / "c.json"), clock=clock)
    assert n == 4 and "compute calibration failed (RuntimeError)" in why and "illegal memory access" in caplog.text


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA as device_capacity and the calibration see it: 10 of 24 GiB free, a named device, no-op syncs."""
    from emo_stream.blocks.memory import GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 24GB")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return GIB


@pytest.mark.parametrize("session_gib, expect, bound", [(0.1, 29, "from compute"), (0.5, 14, "from the device's memory")])
def test_on_cuda_the_capacity_is_the_fewer_of_memory_and_compute(tmp_path, fake_cuda, session_gib, expect, bound):
    from emo_stream.blocks.memory import MemoryProfile

    GIB = fake_cuda
    clock = FakeClock()
    backend = TimedBackend(clock)
    backend.device = torch.device("cuda")
    # 10 GiB free x 0.9 - 2 GiB of activations at batch 4: 7 GiB -> 70 sessions of 0.1 GiB, 14 of 0.5
    backend.memory_profile = lambda batches: MemoryProfile("timed", 64, "bfloat16", weights=GIB,
                                                           session=int(session_gib * GIB),
                                                           activations={1: GIB // 2, 4: 2 * GIB})
    n, why = default_capacity(backend, segment_frames=8, max_batch=4, avatar=lambda: "a",   # mode auto
                              cache=CalibrationCache(tmp_path / "c.json"), clock=clock)
    assert backend.calls["generate"] == 15                        # auto calibrates on CUDA
    assert n == expect and why.startswith(f"{expect} {bound}") and "Fake GPU 24GB" in why
    assert ("memory would hold 70" in why) if bound == "from compute" else ("compute would sustain 29" in why)
    # --calibrate off: memory alone, as before
    n_off, why_off = default_capacity(backend, segment_frames=8, max_batch=4, mode="off",
                                      cache=CalibrationCache(tmp_path / "c.json"), clock=clock)
    assert n_off == (70 if session_gib == 0.1 else 14) and why_off.endswith("compute calibration off")


def test_the_key_names_what_the_step_time_depends_on():
    backend = TimedBackend(FakeClock())
    key = calibration_key(backend, segment_frames=8, max_batch=4, config={"model": "sd15_live", "steps": 4})
    assert key["family"] == "timed" and key["device"].startswith("cpu: ")
    assert {"size": 64, "fps": 25, "segment_frames": 8, "max_batch": 4, "model": "sd15_live",
            "steps": 4}.items() <= key["config"].items()
    backend.steps, backend.model = 4, torch.nn.Linear(2, 2).to(torch.bfloat16)
    key = calibration_key(backend, segment_frames=8, max_batch=4)
    assert key["config"]["dtype"] == "torch.bfloat16" and key["config"]["steps"] == 4   # the model's dtype
    cal = Calibration("cpu: x", "timed", 25, 8, 4, {1: 0.016, 4: 0.034}, (1, 2, 4), 1.5, "2026-12-07 07:00 UTC")
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    with pytest.raises(ValueError):
        Calibration.from_dict({**cal.to_dict(), "step_s": {}})


# -- the server: serve / worker without --max-sessions ------------------------------------------------

def test_serve_calibrates_when_asked_logs_why_and_max_sessions_overrides(tmp_path, monkeypatch, caplog):
    from server.app import build_engine
    from server.config import load_config
    from server.sync import MonotonicClock

    monkeypatch.setenv("EMO_STREAM_CACHE", str(tmp_path))
    cfg = load_config(None, backend="synctest", size=64)
    assert cfg.sessions.calibrate == "auto"
    cfg.sessions.calibrate = "on"                      # a CPU: only when asked
    with caplog.at_level(logging.INFO, logger="server.app"):
        engine = build_engine(cfg, MonotonicClock())
    [line] = [r.getMessage() for r in caplog.records if r.name == "server.app" and "max_sessions" in r.getMessage()]
    n = cfg.sessions.max_sessions
    assert n >= 1 and engine.config.max_sessions == n
    assert line.startswith(f"max_sessions {n} from compute (memory not counted off CUDA): synctest on cpu")
    assert "a live step of 1 frame for 1/2/4 sessions" in line and "calibrated in" in line
    assert (tmp_path / "capacity.json").is_file()
    # a restart: the cached calibration, nothing timed
    caplog.clear()
    cfg2 = load_config(None, backend="synctest", size=64)
    cfg2.sessions.calibrate = "on"
    with caplog.at_level(logging.INFO):
        build_engine(cfg2, MonotonicClock())
    assert cfg2.sessions.max_sessions == n and "cached from" in caplog.text and "timing" not in caplog.text
    # --max-sessions given: no calibration at all, that number
    (tmp_path / "capacity.json").unlink()
    caplog.clear()
    cfg3 = load_config(None, backend="synctest", size=64)
    cfg3.sessions.calibrate = "refresh"
    cfg3.sessions.max_sessions = 3
    with caplog.at_level(logging.INFO):
        assert build_engine(cfg3, MonotonicClock()).config.max_sessions == 3
    assert "max_sessions" not in caplog.text and not (tmp_path / "capacity.json").exists()


def test_calibrate_flag_and_config_key(tmp_path):
    from server.cli import build_parser
    from server.config import load_config
    from server.serve_command import apply_engine_flags

    for command in ("serve", "worker"):
        args = build_parser(command).parse_args([command, "--calibrate", "off", "--max-sessions", "5"])
        cfg = load_config(None)
        apply_engine_flags(cfg, args)
        assert cfg.sessions.calibrate == "off" and cfg.sessions.max_sessions == 5
    path = tmp_path / "s.yaml"
    path.write_text("sessions:\n  calibrate: refresh\n")
    assert load_config(path).sessions.calibrate == "refresh"
    path.write_text("sessions:\n  calibrate: always\n")
    with pytest.raises(ConfigError, match="sessions.calibrate must be one of auto, on, off, refresh"):
        load_config(path)
