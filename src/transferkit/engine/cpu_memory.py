"""Keep freed tensor memory in the process for reuse (glibc on Linux), instead of handing it back to the OS.
Set by every CLI command, by finetune() and rank(), and by each federated client process.

glibc serves every allocation above its mmap threshold (at most 32 MB by default) with a fresh mmap and
unmaps it on free, so each large activation is paged in again, zero-filled, on every batch. On a 2-core
AMD EPYC, EfficientNet-Lite0 at 224 px spent more time in the kernel than in its convolutions: 34.5
images/s at batch 32 (user 6.7 s, sys 7.9 s, 3.1M page faults for 256 images); with the thresholds below,
91 images/s (sys 0.1 s, 29k faults). The cost: memory freed after a peak stays with the process (its
resident size keeps that peak) until the process ends, as with PyTorch's CUDA caching allocator.
Set TRANSFERKIT_MALLOC_TUNING=0 to leave the allocator as it is."""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap, and the heap is not trimmed below that
_tuned = False


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's mmap and trim thresholds once per process; False where that does not apply (another
    libc or OS, or TRANSFERKIT_MALLOC_TUNING=0)."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("TRANSFERKIT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no libc.so.6 / mallopt
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_THRESHOLD))) and bool(
        mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_THRESHOLD)))
    return _tuned
