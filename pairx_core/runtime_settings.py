"""Process and thread settings that make the engine fast on CPU.

- :func:`denormals_flushed` is scoped: switched on for a block, restored after it.
- :func:`keep_freed_memory` is process-wide and opt-in, for processes that explain pairs all day
  (the pipeline's task processes and ``bench/engine.py`` call it).

``torch.set_flush_denormal`` has no getter and acts on the calling thread's floating-point
control word. Threads inherit the mode when they start, and torch's intra-op threads keep the
mode they started with: measured here, after ``set_flush_denormal(True)`` an elementwise op on
2 threads flushes half of its denormal inputs when the pool already existed (the calling
thread's share), all of them when the pool started under the flag; turning the flag off later
leaves the pool flushing. :func:`denormals_flushed` reads the calling thread's state by
multiplying a denormal, sets the flag for the block and puts the previous state back, so a
library call never leaves the caller's thread changed. A process that runs pipeline tasks sets
the mode once when it starts (:func:`configure_task_process`), before torch starts its pool, so
that its pool flushes too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch

#: a float64 denormal: multiplying it by one gives zero exactly when denormals are flushed
_DENORMAL = 1e-310


def denormals_are_flushed() -> bool:
    """Whether the calling thread flushes denormal floats to zero."""
    return bool((torch.tensor([_DENORMAL], dtype=torch.float64) * 1.0).item() == 0.0)


@contextlib.contextmanager
def denormals_flushed(device: torch.device | str | None = "cpu") -> Iterator[None]:
    """Flush denormal floats to zero in this thread while the block runs (CPU only).

    LRP's relevance products reach denormal magnitudes, which make CPU arithmetic many times
    slower; GPUs flush them anyway, so for a CUDA ``device`` this does nothing.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    before = denormals_are_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not before:
            torch.set_flush_denormal(False)


#: glibc ``mallopt`` parameters and the values :func:`keep_freed_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit
_TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Process-wide, glibc only: keep memory that torch frees mapped, for its next allocations.

    The engine allocates and frees the same large temporaries on every pixel-map pass. With
    glibc's defaults the heap top is handed back to the kernel whenever more than 2x the
    adaptive mmap threshold (at most 64 MiB) is free, and the next pass faults those pages in
    again, zeroed: measured on a 2-core CPU (efficientnet_b0, 128 px, 8 pairs per batch,
    k_colors=10), 50,000-90,000 minor page faults per batch and about 5 % of its time. This sets the
    mmap threshold to glibc's 64-bit ceiling (32 MiB; larger tensors are still mapped and
    unmapped one by one) and never trims the heap on free: after the first batch, no faults.
    The cost: the process keeps its peak heap mapped (it is reused, not leaked). A process that
    explains batch after batch reaches that peak every batch anyway; processes that run pipeline
    tasks call this when they start (:func:`configure_task_process`). Setting any threshold also
    turns off glibc's adaptive mmap threshold, which is why Dask's ``MALLOC_TRIM_THRESHOLD_`` made
    workers slow; this undoes that as well.

    Returns:
        whether the settings were applied (False off glibc, e.g. macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_MAX))
    except (OSError, AttributeError):  # not glibc
        return False


def configure_task_process() -> None:
    """Process-wide torch settings of a process that runs pipeline tasks, made once where it starts
    (the Dask worker preload ``infra.worker_setup``, the ``pairx`` command) and never as a side
    effect of a library call or a model load.

    - intra-op threads: ``PAIRX_TORCH_THREADS`` when set (the cluster factory gives each local
      worker cores / workers), torch's default otherwise;
    - denormals flushed to zero in the process's CPU arithmetic (GPUs flush them anyway): LRP's relevance products reach
      denormal magnitudes, which slow CPU arithmetic many times. The engine flushes them for its
      own calls too (:func:`denormals_flushed`), but that reaches only the calling thread: torch's
      intra-op threads keep the mode they started with, so the mode is set before they start;
    - :func:`keep_freed_memory` (glibc).
    """
    keep_freed_memory()
    threads = int(os.environ.get("PAIRX_TORCH_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
