"""Process-wide malloc settings: let glibc keep freed memory for reuse instead of returning it to the OS.

Training allocates and frees the same large temporaries every step, and a DataLoader worker the same arrays every
sample; by default glibc unmaps large blocks and returns freed heap, so the next step or sample page-faults them in
again (the gain and the memory it costs: docs/performance-history-2026-11.md, ``run.py --keep-memory both``).
"""

from __future__ import annotations

import ctypes
import os


def keep_freed_memory(worker_id: int | None = None) -> None:
    """Let glibc's malloc keep freed memory for reuse in this process (no-op elsewhere); also a DataLoader
    ``worker_init_fn``. A worker's working set is a few batches of views, so keeping it costs little memory."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)  # every block from the heap, where freed memory is reused
    mallopt(m_trim_threshold, 2**30)  # return memory to the OS only beyond 1 GiB of free heap


def tune_malloc() -> None:
    """:func:`keep_freed_memory` in this process unless ``LOCA_KEEP_FREED_MEMORY=0`` (``loca`` and the demo call it at
    start). The pretraining DataLoader's workers always do it (it is their ``worker_init_fn``); other loaders' workers
    inherit the process's setting when forked (Linux's default start method)."""
    if os.environ.get("LOCA_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
