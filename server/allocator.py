"""glibc's allocator, tuned for a server that frees frame-sized buffers all day (docs/reliability.md, the hour
at capacity). Elsewhere than glibc every call here does nothing."""

from __future__ import annotations

from typing import Callable


def glibc_function(name: str) -> Callable | None:
    """The C library's `name` where this process runs on glibc, else None."""
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Blocks of `nbytes` or more are mapped and unmapped by themselves (True when set).

    glibc raises this threshold the first time such a block is freed, after which frame-sized buffers come from
    its per-thread arenas, fragment them and stay held when freed: in the hour at capacity the heap in use was
    flat near 50 MiB while held free memory grew 37 -> 75 MiB, and RSS with it. With the threshold fixed, a
    36-session in-process loop held 7-9 MiB free (RSS 169 -> 172 MiB) against 47 -> 67 by default.
    Setting it (like MALLOC_MMAP_THRESHOLD_) turns the raising off."""
    mallopt = glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(-3, nbytes))   # -3: M_MMAP_THRESHOLD
