"""A Dask worker preload for tests: marks which exit handlers of a worker process ran.

Its exit handler is registered at worker start, before ``infra.worker_exit``'s (it is listed
first), so it runs after it: only when the process exits with the interpreter's teardown.
"""

import atexit
import os
from pathlib import Path


def _mark(name: str) -> None:
    Path(os.environ["EXIT_MARKS"], name).write_text(str(os.getpid()))


def dask_setup(worker) -> None:
    atexit.register(_mark, "registered_before_the_exit_hook")
