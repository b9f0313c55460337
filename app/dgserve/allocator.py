"""glibc's malloc, set to keep large blocks for reuse instead of handing them back.

A DG-Net stage allocates more short-lived feature maps than its static backbone: each
block's input is a fresh weighted sum of every earlier block's output. glibc hands large
freed blocks back to the kernel: a block above its mmap threshold is unmapped, and free
memory at the top of the heap past its trim threshold is trimmed (both thresholds move
with the sizes freed). So each forward page-faulted its feature maps in again, the kernel
zeroing every page: 56,384 faults per DG-Net ResNet-50 forward at batch 8. That, not the
arithmetic of the sums, was most of DG-Net's cost over its backbone on a CPU
(``benchmarks/dgnet_cost.py``; ``docs/performance.md``, "DG-Net's own cost").

``keep_large_blocks`` fixes the mmap threshold at 32 MiB, the most glibc allows, so
feature maps come from the heap, and the trim threshold at ``trim_bytes``, so freed heap
is kept for reuse instead of returned at every free. The price is memory: a process
keeps its peak heap, as PyTorch's CUDA caching allocator does on a GPU.
``DGSERVE_MALLOC_KEEP_LARGE_BLOCKS`` turns it off. Elsewhere than glibc (musl, macOS) it
does nothing.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["keep_large_blocks"]

log = logging.getLogger(__name__)

# mallopt's parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_BYTES = 1 << 30


def keep_large_blocks(trim_bytes: int = TRIM_BYTES) -> bool:
    """Apply the settings to this process's glibc malloc; whether it took them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    took = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1
    if not took:
        log.warning("glibc refused the malloc settings for large blocks; feature maps are mapped afresh each time")
    return took
