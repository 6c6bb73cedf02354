"""Optional progress callback for the flows (set by the CLI to drive its progress bar)."""

from __future__ import annotations

from typing import Callable

_CALLBACK: list[Callable[[int, int], None] | None] = [None]


def set_callback(callback: Callable[[int, int], None] | None) -> None:
    _CALLBACK[0] = callback


def current() -> Callable[[int, int], None] | None:
    return _CALLBACK[0]
