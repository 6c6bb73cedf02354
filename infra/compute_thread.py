"""One thread per process runs the pipeline's torch computations.

torch's CPU operators run their parallel regions with GNU OpenMP (libgomp) on Linux. libgomp
gives every thread that starts a parallel region a team of worker threads of its own, kept until
that thread exits. Once a process holds more such workers than it has CPUs, libgomp stops
spin-waiting between parallel regions: its workers go to sleep after every operator and are woken
for the next one. A pipeline process loads a model in one thread and embeds, re-ranks and
explains in task threads (Prefect's or Dask's), so it used to hold several teams. Measured on
2 cores (MiewID architecture, 440 px, stage 1 of one upload against 5 candidates, same process
and inputs): 1.53-1.61 s per pair when only one thread ever computed, 1.82-2.01 s with a second
team anywhere in the process (about 60,000 voluntary context switches per call instead of 5).

:func:`on_compute_thread` runs a function on the process's compute thread (started on first use)
and returns its result; callers in any thread wait for it. Calls run one at a time, in the order
they arrive, which is also what the engine needs (hooks and canonizers are attached to a model
while a call runs). A call made from the compute thread itself runs inline. The caller's context
variables (Prefect's run context, so its loggers) go with the call. The thread flushes denormal
floats (see :mod:`pairx_core.runtime_settings`); it is started after the process's own settings,
so its OpenMP team inherits them.
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

THREAD_NAME = "pairx-compute"

_EXECUTOR: ThreadPoolExecutor | None = None
_THREAD: threading.Thread | None = None
_START_LOCK = threading.Lock()


def _start_thread() -> None:
    global _THREAD
    _THREAD = threading.current_thread()
    torch.set_flush_denormal(True)  # before this thread's first parallel region starts its team


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _START_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME, initializer=_start_thread)
        return _EXECUTOR


def on_compute_thread(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on the process's compute thread; its result, or its exception
    re-raised in the caller."""
    if threading.current_thread() is _THREAD:
        return fn(*args, **kwargs)
    context = contextvars.copy_context()
    return _executor().submit(context.run, fn, *args, **kwargs).result()


def release_compute_thread() -> None:
    """Let the compute thread finish its calls and end, and with it its OpenMP workers; the next
    call starts a new one. For a process whose own thread computes next (a notebook calling
    :mod:`pairx_core` directly after running tasks, a test session): with the compute thread's
    workers still there, its computations would be the oversubscribed ones (small models suffer
    most: a 64 px engine test ran 10x slower)."""
    global _EXECUTOR, _THREAD
    with _START_LOCK:
        executor, _EXECUTOR = _EXECUTOR, None
    if executor is not None:
        executor.shutdown(wait=True)
        _THREAD = None


def _forget_after_fork() -> None:
    """A forked child has no compute thread: it starts its own on first use."""
    global _EXECUTOR, _THREAD, _START_LOCK
    _EXECUTOR, _THREAD, _START_LOCK = None, None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
