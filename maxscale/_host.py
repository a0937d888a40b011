"""Host-process settings that must be made before JAX allocates its first buffers.

`tune_malloc`: XLA:CPU allocates every intermediate buffer of a step with malloc. glibc serves blocks over its mmap
threshold (128 KiB, then adapted) with fresh mmaps and returns freed memory above the trim threshold to the system,
so each step page-faults its larger buffers in again, and the kernel zeroes every page. Measured on the 2-core CPU: a
vmapped gradient of 7 width-64 models spent 17.6 ms per call in the kernel against 34 ms of its own work (52 ms of
CPU, 72 ms wall); with the thresholds below, 0.4 ms in the kernel and 44 ms wall. The cost is that freed memory
stays with the process (its resident size stays at its peak), which a training process reaches anyway.
MAXSCALE_MALLOC_TUNING=0 leaves malloc as it is; other C libraries (musl) and other systems are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}  # 32 MiB: glibc's maximum
_done = False


def tune_malloc() -> bool:
    """Raises glibc's mmap and trim thresholds once per process; True when they are set."""
    global _done
    if _done or sys.platform != "linux" or os.environ.get("MAXSCALE_MALLOC_TUNING", "1") == "0":
        return _done
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    _done = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _done
