"""Device memory per session and per model family, counted without a GPU, and the capacity it allows.

    with PeakMemory() as peak:               # on the meta device: nothing is computed, sizes are exact
        backend.denoise(jobs)
    peak.peak                                # bytes of the activations alive at the worst moment
    tensor_bytes(avatar) + tensor_bytes(state)   # what one session keeps between segments
    profile.sessions(memory_bytes, max_batch)    # sessions that fit (emo_stream.blocks.memory.MemoryProfile)

PeakMemory is a TorchDispatchMode that adds up the storages made by every op run inside it and subtracts them
when they are freed (weak references to the storages), so it sees what a caching allocator has to hold at
once: the activation peak of one forward, on meta as on the CPU. Weights and inputs made before entering are
not counted (they are counted separately). scaled_dot_product_attention is counted as CUDA's fused kernels hold
it (output and log-sum-exp), not as the math form it decomposes into on meta (the whole attention matrix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024 ** 3
HEADROOM = 0.10   # of the device's memory kept free: allocator fragmentation, CUDA context, encoders' buffers


class _FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention on meta as a fused kernel. Off CUDA it decomposes into its math form, which
    holds the whole attention matrix (in float32 for half inputs: ~4 bytes x queries x keys x heads); CUDA runs
    flash / memory-efficient kernels that never hold it. So on meta: the output and the kernel's per-row
    log-sum-exp (float32), nothing else."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            if q.device.type == "meta":
                lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
                out = q.new_empty((*q.shape[:-1], v.shape[-1]))
                del lse
                return out
        return func(*args, **kwargs)


class PeakMemory(TorchDispatchMode):
    """Live bytes of the storages created inside the mode, and their peak (see the module doc). Attention on
    meta is counted as CUDA's fused kernels hold it (_FusedAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self._attention = _FusedAttention()

    def __enter__(self):
        self._attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._attention.__exit__(*exc)

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _meta_to_host(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self._live:
                    n = storage.nbytes()
                    self._live[storage._cdata] = (StorageWeakRef(storage), n)
                    self.current += n
        self.peak = max(self.peak, self.current)
        return out


def _meta_to_host(func, args, kwargs) -> torch.Tensor | None:
    """A meta tensor copied to the host (decoded frames leaving the device) has no data: zeros of its shape,
    so a whole segment runs on meta; None for every other op."""
    if func.overloadpacket.__name__ not in ("_to_copy", "to") or not isinstance(args[0], torch.Tensor) \
            or args[0].device.type != "meta":
        return None
    dst = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            dst = a
    if dst is None or torch.device(dst).type != "cpu":
        return None
    dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
    return torch.zeros(args[0].shape, dtype=dtype or args[0].dtype)


def tensor_bytes(obj: Any, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (tensors, dicts, lists, tuples, dataclasses,
    plain objects' attributes; modules are skipped: weights are counted apart)."""
    seen = set() if _seen is None else _seen
    if _depth > 8 or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module, torch.Generator)):
        return 0
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage._cdata
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return 0
    return sum(tensor_bytes(v, seen, _depth + 1) for v in items)


def weight_bytes(*modules: torch.nn.Module | None, dtype: torch.dtype | None = None) -> int:
    """Parameters + buffers of `modules` (floating ones counted in `dtype` when given)."""
    total, seen = 0, set()
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            size = torch.finfo(dtype).bits // 8 if dtype is not None and t.is_floating_point() else t.element_size()
            total += t.numel() * size
    return total


@dataclass
class MemoryProfile:
    """One family's device memory at a working size and dtype.

    weights      parameters and buffers on the device
    session      what one session keeps between segments: its avatar (reference features, latents; shared
                 when sessions use the same portrait, counted per session here: the worst case) and its state
    activations  batch -> activation peak of one segment (encode, denoise, decode) for that many sessions
    """

    family: str
    size: int
    dtype: str
    weights: int
    session: int
    activations: dict[int, int] = field(default_factory=dict)

    def activation_bytes(self, batch: int) -> int:
        """Activation peak at `batch`, linear through the measured points (activations grow with the batch)."""
        known = sorted(self.activations.items())
        if not known:
            return 0
        if batch in self.activations:
            return self.activations[batch]
        (b0, a0), (b1, a1) = (known[0], known[-1]) if len(known) > 1 else (known[0], known[0])
        slope = (a1 - a0) / (b1 - b0) if b1 != b0 else a0 / max(b0, 1)
        return int(max(a0, a0 + slope * (batch - b0)))

    def sessions(self, memory_bytes: int, max_batch: int, loaded: bool = False, headroom: float = HEADROOM) -> int:
        """Sessions that fit in `memory_bytes` of device memory with batches of up to `max_batch` sessions.
        loaded: `memory_bytes` is what is free with the model already on the device (torch.cuda.mem_get_info)."""
        budget = memory_bytes * (1 - headroom) - (0 if loaded else self.weights)
        budget -= self.activation_bytes(max_batch)
        return max(0, int(budget // max(self.session, 1)))

    def to_dict(self, memories_gb: tuple[int, ...] = (24, 48, 80), max_batch: int = 4) -> dict[str, Any]:
        return {"family": self.family, "size": self.size, "dtype": self.dtype,
                "weights_gib": round(self.weights / GIB, 3), "session_mib": round(self.session / 2 ** 20, 2),
                "activations_gib": {str(b): round(a / GIB, 3) for b, a in sorted(self.activations.items())},
                "max_batch": max_batch,
                "sessions": {f"{gb}GB": self.sessions(gb * GIB, max_batch) for gb in memories_gb}}


def profile_segments(family: str, size: int, weights: int, make_jobs: Callable[[int], tuple[Any, list]],
                     segment: Callable[[Any, list], Any], batches: tuple[int, ...] = (1, 4),
                     batched: bool = True) -> MemoryProfile:
    """Count a family's memory on its meta-device backend: make_jobs(n) -> (backend, n SegmentJobs of fresh
    sessions), segment(backend, jobs) runs one segment as the engine does (denoise + decode, or generate).
    The session's bytes are read after a first segment (its motion / held frames exist then); each batch's
    activation peak is taken on a continuing segment. batched=False: the backend runs a batch's sessions one
    after another (Hallo), so every batch has the one-session peak: only that is run.

    Every segment on meta runs each op through Python meta kernels (milliseconds each at 512 px), so the runs
    are few: the first segment of one session, then one continuing segment per batch size."""
    def run(backend, jobs) -> int:   # always in a PeakMemory: it also lets decoded frames leave meta
        with torch.no_grad(), PeakMemory() as peak:
            segment(backend, jobs)
        return peak.peak

    backend, jobs = make_jobs(1)
    run(backend, jobs)
    state = jobs[0].state
    session = tensor_bytes(state.avatar) + tensor_bytes({k: v for k, v in vars(state).items() if k != "avatar"})
    acts = {1: run(backend, jobs)}     # one session's continuing segment
    for b in sorted(set(batches)):
        if b == 1:
            continue
        if not batched:
            acts[b] = acts[1]
            continue
        backend, jobs = make_jobs(b)
        if not _continue_from(jobs, state):   # sessions as after their first segment, else run it
            run(backend, jobs)
        acts[b] = run(backend, jobs)
    acts = {b: a for b, a in acts.items() if b in batches}
    dtype = str(getattr(backend, "dtype", None) or backend.model.dtype).replace("torch.", "")
    return MemoryProfile(family, size, dtype, weights, session, acts)


def _continue_from(jobs: list, state: Any) -> bool:
    """Give every job a copy of `state` (one session after its first segment; the avatar stays shared), so a
    batch's continuing segment needs no first segment of its own; False when the state cannot be copied."""
    import copy

    try:
        states = [copy.deepcopy(state, {id(state.avatar): state.avatar}) for _ in jobs]
    except Exception:  # noqa: BLE001 (an uncopyable state: the caller runs the first segment instead)
        return False
    for job, st in zip(jobs, states):
        if job.state.avatar is not state.avatar:
            return False
        job.state = st
    return True


def device_capacity(backend, max_batch: int, default: int = 4) -> tuple[int, str]:
    """(sessions, why): how many sessions the device's free memory holds with the model loaded
    (torch.cuda.mem_get_info and the backend's counted memory_profile), or `default` off CUDA or for a backend
    that counts none."""
    device = torch.device(getattr(backend, "device", None) or "cpu")
    profile_fn = getattr(backend, "memory_profile", None)
    if device.type != "cuda" or profile_fn is None:
        return default, f"{default} (the default: {'no memory profile' if device.type == 'cuda' else device.type})"
    free, total = torch.cuda.mem_get_info(device)
    profile = profile_fn((1, max_batch))
    n = max(1, profile.sessions(free, max_batch, loaded=True))
    return n, (f"{n} from the device's memory: {free / GIB:.1f} of {total / GIB:.1f} GiB free, "
               f"{profile.session / 2 ** 20:.0f} MiB per session, "
               f"{profile.activation_bytes(max_batch) / GIB:.2f} GiB activations at batch {max_batch}")
