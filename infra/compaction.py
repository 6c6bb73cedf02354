"""Compact an output's tables: each partition's small Parquet files into one, under the output's lease.

Every run writes one file per table and batch, so a table gains many small files a night;
readers (DuckDB, pandas, pyarrow) pay per file. :func:`compact_output` takes the output root's
lease (``infra.lease``) so that no run writes while it works, refuses when a run holds it, and
rewrites every partition of two files or more with :func:`infra.tables.compact_table` (one
atomic folder swap per partition: readers see the old files or the new one, never both).
Today's partitions are included: under the lease nothing else writes them.

Local output roots only: object stores cannot swap a folder atomically, so a reader there
would see a partition's rows twice, or not at all, while it is rewritten.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pairx_core.errors import ConfigError

from .lease import output_lease
from .storage import OutputLayout, StorageTarget
from .tables import TABLE_SCHEMAS, CompactedPartition, DamagedTableError, compact_table
from .verify import damaged_table_files, require_output_root

__all__ = ["TableCompaction", "compact_output"]


@dataclass(frozen=True)
class TableCompaction:
    """One table before and after :func:`compact_output` (visible Parquet files only)."""

    table: str
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    rows_rewritten: int
    partitions: list[CompactedPartition] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "files_before": self.files_before, "files_after": self.files_after,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "rows_rewritten": self.rows_rewritten, "partitions": len(self.partitions)}


def compact_output(out: str, tables: Sequence[str] | None = None, *, lease_wait_s: float = 0.0,
                   storage_options: Mapping[str, Any] | None = None) -> list[TableCompaction]:
    """Compact ``tables`` (default: all) under output root ``out`` while holding its lease.

    Raises:
        ConfigError: an unknown table, or a remote output root.
        OutputLockedError: a run still holds the lease after ``lease_wait_s`` seconds.
        DamagedTableError: a file of these tables does not read (``pairx verify OUT --repair`` first).
    """
    names = list(tables) if tables else list(TABLE_SCHEMAS)
    unknown = sorted(set(names) - set(TABLE_SCHEMAS))
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}; known: {sorted(TABLE_SCHEMAS)}")
    target = StorageTarget.from_url(out, storage_options)
    if not target.is_local:
        raise ConfigError(f"compaction swaps partition folders atomically, which {target.protocol!r} storage "
                          "cannot do; run it on a local output root")
    require_output_root(out, storage_options)
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date()
    results = []
    with output_lease(out, f"compact-{uuid.uuid4().hex[:12]}", "compact", wait_s=lease_wait_s,
                      storage_options=storage_options):
        tables_folder = f"/{OutputLayout.TABLES}/"
        damaged = [d for d in damaged_table_files(out, storage_options)
                   if any(f"/{OutputLayout.table_path(n)}/" in d.url for n in names)]
        if damaged:  # rewriting a partition would need its rows: repair first
            raise DamagedTableError(damaged[0].url.split(tables_folder, 1)[1].split("/", 1)[0],
                                    [f"{d.url} ({d.reason[:120]})" for d in damaged])
        for name in names:
            files_before, bytes_before = _visible_files(target, name)
            done = compact_table(out, name, before=tomorrow, storage_options=storage_options)
            files_after, bytes_after = _visible_files(target, name)
            results.append(TableCompaction(name, files_before, files_after, bytes_before, bytes_after,
                                           sum(p.rows for p in done), done))
    return results


def _visible_files(target: StorageTarget, table: str) -> tuple[int, int]:
    """How many Parquet files table ``table`` has, and their bytes."""
    paths = target.glob(f"{OutputLayout.table_path(table)}/*/*/*.parquet")
    return len(paths), sum(os.path.getsize(path) for path in paths)
