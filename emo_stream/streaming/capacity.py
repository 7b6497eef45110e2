"""How many live sessions a device sustains in real time: the compute side of the default capacity.

    cal = calibrate(backend, avatar, segment_frames=8, max_batch=4)   # a few warm live steps per batch size
    cal.sessions()                                                    # sessions whose frames it keeps up with
    n, why = default_capacity(backend, segment_frames=8, max_batch=4, avatar=make_avatar)   # serve / worker

A live step is what the engine does for one batch of sessions' segments: their audio encoded (one
encode_audio_batch call when the backend offers it), then denoise + decode (or generate), the frames on the
host. The calibration times it with the device synchronised around each timed step: here only, the serving
loop never waits for the device. It is conservative: the engine overlaps the encoder, denoiser and decoder
stages (their own CUDA streams); the calibration runs them one after another.

Sessions: S sessions need S x segment_frames frames every segment_frames / fps seconds. The engine batches at
most max_batch sessions into a call, so a round of S sessions takes (S // max_batch) x t(max_batch) +
t(S % max_batch), t(b) the step time of b sessions; S fits when that is at most HEADROOM of the round's real
time. The rest is left to the host's own work (video encoding, voice detection, the network) and to jitter.

default_capacity (serve and worker without --max-sessions): on CUDA the smaller of what the device's free memory
holds (emo_stream.blocks.memory.device_capacity) and what its compute sustains; off CUDA 4, unless a calibration
is asked for. Calibrations are kept per device, family, configuration and torch version in a small JSON file
(`default_cache_path`), so a restart with the same setup does not time anything.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emo_stream.backend import SegmentJob, capabilities
from emo_stream.errors import ConfigError
from emo_stream.timeline import samples_per_frame

log = logging.getLogger(__name__)

HEADROOM = 0.8          # of each segment's real time the device may spend computing it
MAX_SESSIONS = 1024     # the calibration's answer is capped here (a cheap backend on a large device)
MODES = ("auto", "on", "off", "refresh")   # auto: calibrate on CUDA only; refresh: ignore a cached calibration
CACHE_VERSION = 1
CACHE_ENTRIES = 64      # calibrations kept in the file (the oldest go first)


@dataclass
class Calibration:
    """Measured live step times of one backend on one device.

    step_s      batch size -> seconds of one live step for that many sessions (median of the timed steps)
    planned     the batch sizes the calibration meant to time; those missing from step_s were not run (a
                smaller batch already missed real time, or the time budget ran out) and are extrapolated
    """

    device: str
    family: str
    fps: int
    segment_frames: int
    max_batch: int
    step_s: dict[int, float]
    planned: tuple[int, ...] = ()
    seconds: float = 0.0          # the calibration's own time
    measured: str = ""            # UTC date and time it was measured
    cached: bool = field(default=False, compare=False)   # read from the cache, not measured by this process

    def step_seconds(self, batch: int) -> float:
        """t(batch): measured, linear between measured sizes, and beyond the largest measured one proportional to
        the batch (no batching gain assumed: an overestimate, so a safe one)."""
        if batch <= 0:
            return 0.0
        known = sorted(self.step_s.items())
        if batch in self.step_s:
            return self.step_s[batch]
        below = [(b, t) for b, t in known if b < batch]
        above = [(b, t) for b, t in known if b > batch]
        if not below:
            b1, t1 = above[0]
            return t1 * batch / b1
        b0, t0 = below[-1]
        if not above:
            return t0 * batch / b0
        b1, t1 = above[0]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)

    def round_seconds(self, sessions: int) -> float:
        """Device time of one segment of every one of `sessions` sessions, batched as the engine batches."""
        full, rest = divmod(sessions, self.max_batch)
        return full * self.step_seconds(self.max_batch) + self.step_seconds(rest)

    def sessions(self, headroom: float = HEADROOM, limit: int = MAX_SESSIONS) -> int:
        """The most sessions (0 when not even one) whose segments the device computes within `headroom` of
        their real time."""
        budget = headroom * self.segment_frames / self.fps
        n = 0
        while n < limit and self.round_seconds(n + 1) <= budget:
            n += 1
        return n

    def describe(self, headroom: float = HEADROOM) -> str:
        """One line: what was measured, and when."""
        sizes = "/".join(str(b) for b in sorted(self.step_s))
        times = "/".join(_ms(self.step_s[b]) for b in sorted(self.step_s))
        skipped = [b for b in self.planned if b not in self.step_s]
        real = self.segment_frames * 1000 / self.fps
        frames = f"{self.segment_frames} frame{'s' if self.segment_frames > 1 else ''}"
        sessions = "1 session" if sizes == "1" else f"{sizes} sessions"
        text = (f"{self.family} on {self.device}: a live step of {frames} for {sessions} takes {times} ms "
                f"against {_ms(real / 1000)} ms of real time at {self.fps} fps, {headroom:.0%} of it used")
        if skipped:
            text += f" (batches of {'/'.join(map(str, skipped))} not timed)"
        when = f"cached from {self.measured}" if self.cached else f"calibrated in {self.seconds:.1f} s"
        return f"{text}; {when}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        d["step_s"] = {str(b): t for b, t in sorted(self.step_s.items())}
        d["planned"] = list(self.planned)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        d = dict(d)
        d["step_s"] = {int(b): float(t) for b, t in d["step_s"].items()}
        d["planned"] = tuple(int(b) for b in d.get("planned", ()))
        cal = cls(**d)
        if not cal.step_s or min(cal.step_s.values()) <= 0 or cal.max_batch < 1 or cal.fps < 1 \
                or cal.segment_frames < 1:
            raise ValueError("an empty or impossible calibration")
        return cal


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, and max_batch: the sizes the engine's batches take most (and torch.compile's
    buckets)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


def calibrate(backend: Any, avatar: Any, *, segment_frames: int, max_batch: int, headroom: float = HEADROOM,
              warmup: int = 2, repeats: int = 3, budget_s: float = 60.0,
              clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] | None = None,
              device: str | None = None) -> Calibration:
    """Time the backend's live step for batches of 1, 2, 4, ... max_batch sessions of `avatar`: `warmup` untimed
    steps (kernels chosen, allocator grown, a fresh session's first segment), then the median of `repeats` timed
    ones (one, when it takes twice the real time or `budget_s` has passed). A batch size is not run once a smaller
    one already misses real time (no larger count can fit then) or once `budget_s` has passed (the rest
    extrapolated). `clock` and `synchronize` (default: the CUDA device's, a
    no-op elsewhere) are injectable: tests give a backend whose step takes a known time on a fake clock."""
    if segment_frames < 1 or max_batch < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(f"calibration needs segment_frames, max_batch, repeats >= 1 and warmup >= 0: got "
                          f"{segment_frames}, {max_batch}, {repeats}, {warmup}")
    caps = capabilities(backend)
    fps = int(backend.fps)
    sync = synchronize if synchronize is not None else _device_sync(caps.device)
    audio, start = _speech(backend, segment_frames)
    planned = batch_sizes(max_batch)
    real_time = headroom * segment_frames / fps
    step_s: dict[int, float] = {}
    t_start = clock()
    with _no_grad():
        for b in planned:
            if step_s and clock() - t_start > budget_s:
                break
            states = [backend.new_state(avatar, seed=i) for i in range(b)]
            times = []
            for k in range(warmup + repeats):
                sync()
                t0 = clock()
                _live_step(backend, caps, avatar, states, audio, start, segment_frames)
                sync()
                if k >= warmup:
                    times.append(clock() - t0)
                    # one warm step twice over real time settles it (a slow family's start-up stays short),
                    # and the time budget holds within a batch size too
                    if times[-1] > 2 * real_time or clock() - t_start > budget_s:
                        break
            step_s[b] = float(np.median(times))
            del states
            if step_s[b] > real_time:
                break
    return Calibration(device=device or device_label(caps.device), family=caps.name, fps=fps,
                       segment_frames=segment_frames, max_batch=max_batch, step_s=step_s, planned=planned,
                       seconds=round(clock() - t_start, 2),
                       measured=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _live_step(backend: Any, caps, avatar: Any, states: list, audio: np.ndarray, start: int, frames: int) -> None:
    """One engine step for len(states) sessions: encode (batched when offered), denoise + decode or generate."""
    if caps.batch_audio:
        feats = backend.encode_audio_batch([(audio, start, frames)] * len(states))
    else:
        feats = [backend.encode_audio(audio, start, frames) for _ in states]
    jobs = [SegmentJob(avatar=avatar, state=s, features=f, num_frames=frames) for s, f in zip(states, feats)]
    out = backend.decode(jobs, backend.denoise(jobs)) if caps.split else backend.generate(jobs)
    if len(out) != len(jobs):
        raise RuntimeError(f"the backend returned {len(out)} segments for {len(jobs)} jobs")


def _speech(backend: Any, frames: int) -> tuple[np.ndarray, int]:
    """Noise as loud as speech with the backend's left context and look-ahead: (window, start of the segment)."""
    ctx = backend.audio_context
    spf = samples_per_frame(int(backend.fps))
    left = int(ctx.left_samples)
    n = left + (frames + max(0, int(ctx.lookahead_frames))) * spf
    return (np.random.default_rng(0).standard_normal(n) * 0.1).astype(np.float32), left


def _device_sync(device: Any) -> Callable[[], None]:
    if getattr(device, "type", None) != "cuda":
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)


def _no_grad():
    try:
        import torch
    except ImportError:   # a backend without torch
        return contextlib.nullcontext()
    return torch.no_grad()


def device_label(device: Any) -> str:
    """"cuda: <GPU name>", or "cpu: <processor> (<cores> cores, torch threads <n>)": what a calibration is
    valid for."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    threads = ""
    with contextlib.suppress(ImportError):
        import torch

        threads = f", torch threads {torch.get_num_threads()}"
    return f"cpu: {name} ({os.cpu_count()} cores{threads})"


# -- the cache ---------------------------------------------------------------------------------------

def default_cache_path() -> Path:
    """$EMO_STREAM_CACHE/capacity.json, else ~/.cache/emo-stream/capacity.json."""
    root = os.environ.get("EMO_STREAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emo-stream")
    return Path(root) / "capacity.json"


def calibration_key(backend: Any, *, segment_frames: int, max_batch: int, config: dict | None = None) -> dict:
    """What a calibration holds for: the device's name, the family, its configuration (the caller's `config`,
    e.g. the model, plus the backend's size, fps, steps, guidance, decoder, dtype, execution settings, the
    segment length and batch size) and the torch version."""
    caps = capabilities(backend)
    own = {k: getattr(backend, k, None) for k in ("size", "fps", "steps", "idle_steps", "guidance", "decoder",
                                                   "execution")}
    own.update(dtype=_dtype(backend), segment_frames=segment_frames, max_batch=max_batch)
    try:
        import torch

        version = f"{torch.__version__} (cuda {torch.version.cuda})"
    except ImportError:
        version = None
    return {"device": device_label(caps.device), "family": caps.name, "torch": version,
            "config": json.loads(json.dumps({**own, **(config or {})}, sort_keys=True, default=str))}


def _dtype(backend: Any) -> str | None:
    """The backend's dtype, or its model's (the loaders choose it by device; the key must change with it)."""
    dtype = getattr(backend, "dtype", None)
    if dtype is None:
        model = getattr(backend, "model", None)
        dtype = getattr(model, "dtype", None)
        if dtype is None and callable(getattr(model, "parameters", None)):
            dtype = next((p.dtype for p in model.parameters()), None)
    return None if dtype is None else str(dtype)


class CalibrationCache:
    """Calibrations in one JSON file, by key (calibration_key). A missing, unreadable or damaged file is an
    empty cache (warned once); a file that cannot be written is warned about and the calibration still used."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_cache_path()

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def _entries(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("capacity calibration cache %s unreadable (%s): calibrating again", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or \
                not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def get(self, key: dict) -> Calibration | None:
        entry = self._entries().get(self.digest(key))
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        try:
            cal = Calibration.from_dict(entry["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("capacity calibration cache %s: a damaged entry (%s): calibrating again", self.path, exc)
            return None
        cal.cached = True
        return cal

    def put(self, key: dict, cal: Calibration) -> None:
        entries = self._entries()
        entries[self.digest(key)] = {"key": key, "calibration": cal.to_dict()}
        if len(entries) > CACHE_ENTRIES:
            ordered = sorted(entries.items(), key=lambda kv: str(kv[1].get("calibration", {}).get("measured", "")))
            entries = dict(ordered[-CACHE_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
            os.replace(tmp, self.path)   # a reader never sees half a file
        except OSError as exc:
            log.warning("capacity calibration not cached (%s: %s): the next start calibrates again", self.path,
                        exc.strerror or exc)


# -- serve / worker's default ------------------------------------------------------------------------

def default_capacity(backend: Any, *, segment_frames: int, max_batch: int, mode: str = "auto",
                     avatar: Callable[[], Any] | None = None, config: dict | None = None,
                     cache: CalibrationCache | None = None, headroom: float = HEADROOM, default: int = 4,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[int, str]:
    """(sessions, why) for a server not given a capacity. On CUDA: the smaller of the memory-based
    (device_capacity) and compute-based (a calibration, cached) counts; off CUDA `default`, or with calibrate
    "on" / "refresh" the compute-based count alone (memory is not counted there). mode "off" skips the
    calibration; "auto" runs it on CUDA only. `avatar()` makes the portrait the calibration animates (called
    only when a calibration runs); `config` adds to the cache key what the backend does not show (the model).
    A calibration that fails is warned about and leaves the memory-based count."""
    from emo_stream.blocks.memory import device_capacity

    if mode not in MODES:
        raise ConfigError(f"calibrate must be one of {', '.join(MODES)}: got {mode!r}")
    device = capabilities(backend).device
    cuda = getattr(device, "type", None) == "cuda"
    memory_n, memory_why = device_capacity(backend, max_batch, default)
    memory_counted = cuda and callable(getattr(backend, "memory_profile", None))
    if mode == "off" or (mode == "auto" and not cuda):
        note = "compute calibration off" if mode == "off" else \
            "no compute calibration off CUDA unless asked for (--calibrate on)"
        return memory_n, f"{memory_why}; {note}"
    cache = cache or CalibrationCache()
    key = calibration_key(backend, segment_frames=segment_frames, max_batch=max_batch, config=config)
    cal = cache.get(key) if mode != "refresh" else None
    if cal is None:
        try:
            if avatar is None:
                raise ConfigError("no portrait to calibrate with")
            log.info("timing %s's live step on %s for the default capacity (cached afterwards in %s) ...",
                     capabilities(backend).name, key["device"], cache.path)
            cal = calibrate(backend, avatar(), segment_frames=segment_frames, max_batch=max_batch,
                               headroom=headroom, clock=clock)
        except Exception as exc:   # noqa: BLE001 (start anyway, with the memory-based count; the reason is logged)
            log.warning("compute calibration failed (%s: %s): the capacity comes from memory only",
                        type(exc).__name__, exc)
            return memory_n, f"{memory_why}; compute calibration failed ({type(exc).__name__})"
        cache.put(key, cal)
    compute_n = cal.sessions(headroom)
    measured = f"{cal.describe(headroom)} ({cache.path})"
    if compute_n == 0:
        measured += "; not even one session keeps real time: its stream will fall behind"
    compute_n = max(1, compute_n)
    if not memory_counted:
        where = "" if cuda else " (memory not counted off CUDA)"
        return compute_n, f"{compute_n} from compute{where}: {measured}"
    if compute_n <= memory_n:
        return compute_n, f"{compute_n} from compute (memory would hold {memory_n}): {measured}"
    return memory_n, f"{memory_why} (compute would sustain {compute_n}: {measured})"
