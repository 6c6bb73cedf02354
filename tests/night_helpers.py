"""Synthetic nights on disk for the flow tests: a gallery folder per individual and uploads."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def write_night(root: Path, individuals: int, seed: int, *, upload_seeds: Sequence[int] = (1,),
                uploaders: int | None = None, size: tuple[int, int] = (64, 64)) -> Path:
    """``gallery/<id>/a.png`` (photo seed 0) for each of ``individuals`` synthetic individuals, and
    ``uploads/<id>.png`` (one upload seed) or ``uploads/<id>-<seed>.png`` (several) for the first
    ``uploaders`` of them (default: all). Returns ``root``."""
    from pairx_core.synthetic import make_individuals, render_photo

    population = make_individuals(individuals, seed=seed)
    (root / "uploads").mkdir(parents=True, exist_ok=True)
    for ind in population:
        (root / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=size).image.save(root / "gallery" / ind.id / "a.png")
    for ind in population[:uploaders]:
        for upload_seed in upload_seeds:
            name = f"{ind.id}.png" if len(upload_seeds) == 1 else f"{ind.id}-{upload_seed}.png"
            render_photo(ind, seed=upload_seed, size=size).image.save(root / "uploads" / name)
    return root


def repair_log_streams() -> int:
    """Point log handlers left on a closed stream (a ``CliRunner`` invocation's captured stderr,
    taken by a handler created during it) back at the real stderr; returns how many.

    Call after in-process CLI runs of flows, so that later tests' log records have somewhere to go.
    """
    import logging
    import sys

    repaired = 0
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.__stderr__  # (setStream would flush the closed one)
                repaired += 1
            console = getattr(handler, "console", None)
            if console is not None and getattr(getattr(console, "file", None), "closed", False):
                console.file = sys.__stderr__
                repaired += 1
    return repaired
