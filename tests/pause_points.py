"""Test shim: the ``pairx`` command with one function made to block, to signal a run at a known point.

``PAIRX_TEST_PAUSE=module:attr[.attr]`` names the function; when called it writes its pid to
``PAIRX_TEST_PAUSE_MARKER`` and sleeps (up to 10 min) instead of returning. With
``PAIRX_TEST_PAUSE_STUBBORN=1`` it also ignores interrupts (a task thread stuck in native code).
Run as ``python tests/pause_points.py <pairx arguments>``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
from pathlib import Path


def _blocking(original, marker: str, stubborn: bool):
    @functools.wraps(original)
    def blocked(*args, **kwargs):
        Path(marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                time.sleep(0.1)
            except BaseException:  # noqa: BLE001 - a stuck call does not notice
                if not stubborn:
                    raise
        return original(*args, **kwargs)

    return blocked


def install() -> None:
    module_name, path = os.environ["PAIRX_TEST_PAUSE"].split(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, _blocking(getattr(owner, name), os.environ["PAIRX_TEST_PAUSE_MARKER"],
                                   os.environ.get("PAIRX_TEST_PAUSE_STUBBORN") == "1"))


if __name__ == "__main__":
    sys.path.pop(0)  # the tests folder: the project's modules come from the installed package
    install()
    from flows.cli import main

    sys.argv = ["pairx", *sys.argv[1:]]
    main()
