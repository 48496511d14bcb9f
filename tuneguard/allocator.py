"""glibc's allocator, set for tensor work on CPU: freed blocks are reused, not handed back and faulted in again.

By default glibc serves blocks above an adaptive threshold with fresh ``mmap`` s and returns a freed heap
top to the OS, so the activations, gradients and logits chunks a step allocates are zero-filled by the
kernel a 4 KiB page at a time, step after step. On the 2-core guests tuneguard is built on a page fault
costs about 3 µs (fresh memory fills at ~1.2 GB/s where a copy runs at 45 GB/s): an elementwise op
over a 6 MB activation took 4 ms instead of 0.5 ms, and an fp32 training step of SmolLM2-135M took
40-65 thousand faults. With blocks up to 32 MB taken from the heap and the heap never trimmed on its
own, a step runs with almost none; the peak resident size stays what it was (the heap's high-water
mark was the peak anyway), and :func:`trim_heap` still returns what a phase left behind when asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20
"""glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit): larger blocks still get their own mapping."""
TRIM_THRESHOLD = 2**31 - 1
"""mallopt takes a C int: the largest, so the heap is trimmed only when asked."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to set
        return None


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MB from the heap and never trim it implicitly; True where glibc took both."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim_heap() -> None:
    """Give memory the allocator holds but nothing uses back to the OS (after loading, before the peak)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
