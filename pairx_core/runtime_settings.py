"""Torch settings that outlive a call, switched on for a block and restored after it.

``torch.set_flush_denormal`` has no getter and acts on the calling thread's floating-point
control word. Threads inherit the mode when they start, and torch's intra-op threads keep the
mode they started with: measured here, after ``set_flush_denormal(True)`` an elementwise op on
2 threads flushes half of its denormal inputs when the pool already existed (the calling
thread's share), all of them when the pool started under the flag; turning the flag off later
leaves the pool flushing. :func:`denormals_flushed` reads the calling thread's state by
multiplying a denormal, sets the flag for the block and puts the previous state back, so a
library call never leaves the caller's thread changed. A process that runs pipeline tasks sets
the mode once, before its first model load (``tasks.runtime``), so that its pool flushes too.
"""

from __future__ import annotations

import contextlib
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
