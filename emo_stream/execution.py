"""How a model runs on its device: memory layout and torch.compile, with a clean CPU fall-back.

    opts = ExecutionOptions(compile="reduce-overhead", channels_last=None)   # None: on for CUDA
    apply_execution(model, opts)

- dtype: chosen when the model loads (EmoBackend.load(dtype="bf16"); fp16 is CUDA's default, fp32 the CPU's).
- attention: every EMO processor and diffusers' AttnProcessor2_0 call torch's scaled_dot_product_attention,
  which picks flash / memory-efficient kernels on CUDA for fp16/bf16 and a fused kernel on the CPU.
- channels_last: NHWC convolutions (faster on tensor cores); on by default on CUDA, off on the CPU.
- compile: torch.compile of the backbone UNet, the per-step denoiser, for the fixed live shapes (sessions x
  segment frames x latent size). "reduce-overhead" adds CUDA graphs. Off on the CPU (the wins are GPU
  kernel fusion and launch overhead); if compiling or a compiled call fails, the denoiser falls back to eager
  for good, with one warning, so a session never dies of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from emo_stream.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


# Batch buckets: with torch.compile(dynamic=False) every new batch size is a new graph (and with CUDA graphs a
# new capture); sessions come and go, so a batch is padded up to the next bucket and the padding rows' outputs
# are dropped: at most len(BATCH_BUCKETS) graphs per segment length instead of one per session count.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_size(rows: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket >= rows; rows itself without buckets or above the largest."""
    return next((b for b in sorted(buckets) if b >= rows), rows)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its first dimension padded to `rows` by repeating its last row."""
    extra = rows - tensor.shape[0]
    return tensor if extra <= 0 else torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])])


def compile_forward(module: torch.nn.Module, mode: str, what: str) -> None:
    """torch.compile `module.forward` in place (once), dynamic=False (one graph per bucketed shape), falling
    back to eager for good on any compiler failure. More graphs than dynamo's default limit are allowed: one
    per batch bucket and segment length."""
    if mode == "off" or isinstance(module.forward, EagerFallback):
        return
    import torch._dynamo

    limit = 4 * len(BATCH_BUCKETS) * 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    eager = module.forward
    compiled = torch.compile(eager, mode=None if mode == "default" else mode, dynamic=False)
    module.forward = EagerFallback(compiled, eager, what)


def step_timesteps(scheduler, steps: int, device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """Set a diffusers scheduler's `steps` timesteps on the host; (host int, device 0-d tensor) per step.

    The sampling loops hand the host int to scheduler.step() / scale_model_input(), which index the schedule's
    tables with it (a device timestep there is a GPU->host read, i.e. a sync, at every step), and the device
    tensor to the model (torch.full fills on the device: no host->device copy, which would block too)."""
    scheduler.set_timesteps(steps)
    return [(int(t), torch.full((), int(t), dtype=scheduler.timesteps.dtype, device=device))
            for t in scheduler.timesteps]


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the device: on CUDA through pinned memory with
    non_blocking=True (a plain .to("cuda") from pageable memory blocks until the stream has drained)."""
    device = torch.device(device)
    if tensor.device.type != "cpu" or device.type == "cpu":
        return tensor.to(device, dtype)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)


@dataclass
class ExecutionOptions:
    compile: str = "off"
    channels_last: bool | None = None   # None: on for CUDA

    def validate(self) -> "ExecutionOptions":
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)} (got {self.compile!r})")
        return self


class EagerFallback:
    """Calls `compiled`; the first exception switches to `eager` for good (logged once)."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], what: str):
        self.compiled, self.eager, self.what = compiled, eager, what
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (any compiler failure: run eager instead)
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("torch.compile of the %s failed (%s); running it eagerly", self.what, self.failed)
        return self.eager(*args, **kwargs)


def apply_execution(model, options: ExecutionOptions) -> dict[str, Any]:
    """Apply `options` to an EmoModel in place; returns what was applied (for logs and benchmarks)."""
    options.validate()
    device = model.device
    cuda = device.type == "cuda"
    applied: dict[str, Any] = {"device": str(device), "dtype": str(model.dtype).replace("torch.", "")}
    channels_last = cuda if options.channels_last is None else options.channels_last
    if channels_last:
        for part in (model.backbone.unet, model.reference_net.unet, model.vae, model.taesd):
            if part is not None:
                part.to(memory_format=torch.channels_last)
    applied["channels_last"] = bool(channels_last)
    mode = options.compile
    if mode != "off" and not cuda:
        log.warning("compile=%s asked for on %s: torch.compile is used on CUDA only; running eagerly", mode, device)
        mode = "off"
    compile_forward(model.backbone.unet, mode, "denoiser (backbone UNet)")
    applied["compile"] = mode
    return applied
