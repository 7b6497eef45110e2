"""Count, on a CPU-only machine, what would make the host wait for an accelerator.

    with count_host_syncs() as log:          # the model and its inputs on the meta device, which plays the GPU
        backend.denoise(jobs)
    log.syncs()                              # Counter of (kind, where) for everything that blocks the host

On CUDA a host waits for the GPU when it reads a device value (`.item()`, `bool(t)`, `int(t)`, indexing a
tensor with a device scalar: aten._local_scalar_dense), when an op's output shape depends on device data
(`nonzero`, boolean-mask indexing, `repeat_interleave` with tensor repeats, `unique`, ...), when data leaves
the device (`.cpu()`, `.tolist()`, `.numpy()`), and when host data is copied in without pinned memory and
`non_blocking=True` (`.to("cuda")`, `torch.tensor(..., device="cuda")`, indexing with a Python list: the copy
waits for the stream to drain; pytorch/pytorch#120996). torch.cuda.set_sync_debug_mode needs a GPU; this counts
the same events with a TorchDispatchMode (aten level, so inside diffusers too) and a TorchFunctionMode (Python
list indices, torch.tensor), with "device" meaning any non-CPU device. On meta a read-back cannot run: the probe
answers it with a zero/False (and device->host copies with zeros) so the whole loop runs and every event is
counted, not just the first.

Non-blocking copies (`non_blocking=True`, what emo_stream.execution.to_device does from pinned memory on CUDA)
are recorded as "async host->device copy" and are not syncs.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx.experimental._config  # noqa: F401 (meta_nonzero_assume_all_nonzero)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ASYNC_COPY = "async host->device copy"
# ops whose output shape depends on device data: CUDA must finish them before the host knows the size
DATA_DEPENDENT = {"nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "bincount", "histc", "masked_scatter", "argwhere", "_assert_async"}
_SCALAR_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}
_COPIES = {"_to_copy", "to", "copy_", "_copy_from", "_copy_from_and_resize"}


def _on_device(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


def _where() -> str:
    """The innermost emo_stream (else diffusers/transformers) frame: file:line function."""
    frames = traceback.extract_stack()[:-3]
    for keep in ("/emo_stream/", "/diffusers/", "/transformers/"):
        for fr in reversed(frames):
            if keep in fr.filename:
                path = fr.filename[fr.filename.index(keep) + 1:]
                return f"{path}:{fr.lineno} {fr.name}"
    return "?"


@dataclass
class SyncLog:
    events: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str) -> None:
        self.events.append((kind, _where()))

    def syncs(self) -> Counter:
        """(kind, where) -> count, for the events that block the host (async copies left out)."""
        return Counter(e for e in self.events if e[0] != ASYNC_COPY)

    def total(self) -> int:
        return sum(self.syncs().values())


def _fake_scalar(t: torch.Tensor):
    return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)


class _Dispatch(TorchDispatchMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SCALAR_READS and any(_on_device(a) for a in args):
            self.log.add(f"device value read on the host ({name})")
            if args[0].device.type == "meta":
                return True if name == "equal" else _fake_scalar(args[0])
        elif name == "repeat_interleave":
            # int repeats (or a given output_size) expand on the device; tensor repeats size the output from data
            given = kwargs.get("output_size") is not None or (len(args) > 3 and args[3] is not None)
            if func._overloadname != "self_int" and not given and any(_on_device(a) for a in args):
                self.log.add("data-dependent shape (repeat_interleave with tensor repeats)")
        elif name in DATA_DEPENDENT and any(_on_device(a) for a in args):
            self.log.add(f"data-dependent shape ({name})")
        elif name in ("index", "index_put", "index_put_") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool and _on_device(i) for i in (args[1] or [])):
            self.log.add("data-dependent shape (boolean mask index)")
        elif name in _COPIES:
            out = self._copy(func, name, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _copy(self, func, name, args, kwargs):
        if name in ("copy_", "_copy_from", "_copy_from_and_resize"):
            dst, src = (args[0], args[1]) if name == "copy_" else (args[1], args[0])
            src_dev, dst_dev = src.device, dst.device
        else:
            src = args[0]
            src_dev = src.device
            dst_dev = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (torch.device, str)):
                    dst_dev = a
                elif isinstance(a, torch.Tensor):
                    dst_dev = a.device
            dst_dev = torch.device(dst_dev) if dst_dev is not None else src_dev
        if (src_dev.type == "cpu") == (dst_dev.type == "cpu"):
            return None
        if src_dev.type == "cpu":
            non_blocking = bool(kwargs.get("non_blocking")) or (
                func._overloadname in ("device", "dtype", "other") and any(a is True for a in args[2:4]))
            if non_blocking and dst_dev.type != "cuda" or (non_blocking and src.is_pinned()):
                self.log.add(ASYNC_COPY)
            else:
                self.log.add("host->device copy (blocking)")
            return None
        self.log.add("device->host copy")
        if src_dev.type == "meta":  # data leaving the device (decoded frames): go on with zeros of that shape
            if name == "copy_":
                return args[0]
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
            return torch.zeros(src.shape, dtype=dtype or src.dtype)
        return None


class _Function(TorchFunctionMode):
    """What never reaches the dispatcher as a copy: Python-list / numpy indices of device tensors."""

    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _on_device(args[0]):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list) or (hasattr(i, "__array__") and not isinstance(i, torch.Tensor))
                   for i in index):
                self.log.add("host->device copy (blocking: Python list index)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncLog]:
    """Record host syncs of everything run inside (see the module doc)."""
    log = SyncLog()
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def _new(real, what):
        def make(data, *args, **kwargs):
            dev = kwargs.get("device")
            on_host = not isinstance(data, torch.Tensor) or data.device.type == "cpu"
            if dev is not None and torch.device(dev).type != "cpu" and on_host:
                log.add(f"host->device copy (blocking: {what} on a device)")
            return real(data, *args, **kwargs)
        return make

    # torch.tensor(data, device=...) copies without passing the dispatcher's copy ops
    torch.tensor, torch.as_tensor = _new(real_tensor, "torch.tensor"), _new(real_as_tensor, "torch.as_tensor")
    try:
        # nonzero on meta: answer with every element non-zero (its shape is what the run needs), counted anyway
        with torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True), _Function(log), \
                _Dispatch(log):
            yield log
    finally:
        torch.tensor, torch.as_tensor = real_tensor, real_as_tensor
