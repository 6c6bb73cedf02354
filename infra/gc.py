"""Garbage collection of an output root: what uncommitted batch writes left behind.

A batch commits by writing its ``pairs`` rows last (``tasks.explain.commit_batch``); its
``matches`` file and pictures carry the same ``commit_id``. A batch killed between its writes
(SIGKILL, a lost machine) leaves matches and pictures whose commit id no ``pairs`` row has:
readers never join them (``infra/views.sql``), and :func:`collect_orphans` deletes them, plus
temporary files of interrupted atomic writes.

Which runs are over: runs write only while they hold the output's lease (``infra.lease``). A
caller that holds the lease itself (``pairx gc`` does) passes ``runs_ended=True``: every run
that left files has then released its lease or let it expire, so its orphans go whatever their
age. Without the lease the writers' state is unknown and only files older than ``min_age_s``
are touched, so a batch still being written is safe.

A ``pairs`` file that does not read would make its committed batches look uncommitted:
:func:`collect_orphans` refuses (:class:`infra.tables.DamagedTableError`) until it is repaired.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .storage import OutputLayout, StorageTarget, is_temp_name, is_transient
from .tables import read_table

__all__ = ["GcReport", "collect_orphans"]

logger = logging.getLogger("pairx.gc")

_PICTURE_RE = re.compile(r"-(?P<commit>[0-9a-f]{16})\.png$")


@dataclass
class GcReport:
    """What :func:`collect_orphans` removed (or would remove, with ``dry_run``)."""

    matches_files: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.matches_files) + len(self.pictures) + len(self.temp_files)


def _age_s(fs, path: str) -> float:
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if isinstance(stamp, datetime):
        stamp = stamp.timestamp()
    return time.time() - float(stamp) if stamp else float("inf")


def collect_orphans(out: str, *, min_age_s: float = 3600.0, dry_run: bool = False, runs_ended: bool = False,
                    storage_options: Mapping[str, Any] | None = None) -> GcReport:
    """Delete matches files and pictures of batches that never committed, and stale temp files.

    Args:
        min_age_s: without ``runs_ended``, only files at least this old.
        runs_ended: the caller holds the output's lease, so no run writes: age does not matter.

    Raises:
        DamagedTableError: a ``pairs`` file does not read (repair first: ``pairx verify --repair``).
    """
    import pyarrow.parquet as pq

    if runs_ended:
        min_age_s = 0.0
    target = StorageTarget.from_url(out, storage_options)
    fs = target.filesystem()
    committed = set(read_table(out, "pairs", columns=["commit_id"], storage_options=storage_options,
                               damaged="raise")["commit_id"].dropna())
    report = GcReport()
    everything = target.list_files(OutputLayout.table_path("matches")) + target.list_files(OutputLayout.VIZ)
    for url in everything:
        path = target.raw_path(url)
        if url.endswith(".parquet"):
            try:
                with fs.open(path, "rb") as handle:
                    ids = set(pq.read_table(handle, columns=["commit_id"])["commit_id"].drop_null().to_pylist())
            except Exception as error:  # noqa: BLE001 - a damaged matches file is for `pairx verify`, not gc
                if is_transient(error) or isinstance(error, FileNotFoundError):
                    raise
                logger.warning("damaged matches file left alone (see `pairx verify`): %s: %s", url, error)
                continue
            if ids and not ids & committed and _age_s(fs, path) >= min_age_s:
                report.matches_files.append(url)
        elif (match := _PICTURE_RE.search(url)) and match["commit"] not in committed:
            if _age_s(fs, path) >= min_age_s:
                report.pictures.append(url)
    for folder in (OutputLayout.TABLES, OutputLayout.VIZ):
        base = target.raw_path(folder)
        if not fs.exists(base):
            continue
        for path in fs.find(base):
            if is_temp_name(path) and _age_s(fs, path) >= min_age_s:
                report.temp_files.append(StorageTarget._canonical(fs, path))
    if not dry_run:
        for url in report.matches_files + report.pictures + report.temp_files:
            target.delete(url)
    return report
