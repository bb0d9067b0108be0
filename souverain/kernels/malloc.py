"""Keep freed memory in the process rather than handing it back to the kernel at once.

glibc serves a large allocation (above its mmap threshold: 128 KiB at first, rising with use) with
fresh pages from the kernel, and gives freed heap above its trim threshold back. Each fresh page
then costs a page fault and the kernel zeroing it. The engine allocates tensors of megabytes every
step (a 1,024-token prefill chunk makes ~10 MB of output per projection): on this project's
machines those faults cost as much as the products themselves (2.0 M minor faults against 0.3-0.5 M
for the same 120 products, and up to 2x the time). Raising both thresholds lets glibc reuse the
freed blocks. The price: up to `trim_threshold` of freed memory stays with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit machines
_done: list[bool] = []


def retain_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Serve allocations up to 32 MiB from the heap and keep up to `trim_threshold` bytes of freed
    heap. Process-wide and idempotent; False where the C library is not glibc (nothing changes)."""
    if _done:
        return _done[0]
    ok = False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators, as they are
        pass
    if not ok:
        log.info("could not tune the C allocator (not glibc): large tensors may page-fault every step")
    _done.append(ok)
    return ok
