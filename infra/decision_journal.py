"""A durable journal of acknowledged decisions, flushed to the ``decisions`` table in batches.

The review server acknowledges a decision only once it is in the journal: one JSON line appended
to the current segment file and ``fsync``-ed. Every few seconds (or every ``flush_rows``
decisions) the segment is sealed, its rows are written to the table as ONE Parquet file per
model (``infra.decisions.write_decisions``) and the segment is deleted. A server killed at any
point leaves segments behind; :meth:`DecisionJournal.recover` writes their rows at the next
start, skipping rows whose ``decision_id`` is already in the table (a kill between the Parquet
write and the delete), and ignoring a torn last line (never acknowledged).

The journal lives on local disk (``fsync``): ``OUT/_pairx/review-journal/`` for a local OUT.
One server per journal: :meth:`DecisionJournal.open` takes an exclusive lock on the folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pairx_core.errors import ConfigError

from .decisions import read_decisions, write_decisions

__all__ = ["DecisionJournal"]

logger = logging.getLogger(__name__)

_SEGMENT_GLOB = "segment-*.jsonl"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DecisionJournal:
    """Append, flush and recover decisions for output root ``out`` (see the module docstring)."""

    def __init__(self, folder: str | Path, out: str, run_id: str, storage_options: Mapping[str, Any] | None = None,
                 *, flush_rows: int = 50):
        self.folder = Path(folder)
        self.out, self.run_id, self.storage_options = out, run_id, storage_options
        self.flush_rows = flush_rows
        self._lock = threading.Lock()  # appends and sealing
        self._flush_lock = threading.Lock()  # one flush at a time
        self._handle: Any = None
        self._segment: Path | None = None
        self._pending: list[dict] = []
        self._pending_since: float | None = None
        self._sealed: list[tuple[Path, list[dict]]] = []
        self._lock_fd: int | None = None

    # -------------------------------------------------------------------- lifecycle
    def open(self) -> int:
        """Lock the folder (one server per journal) and recover what an earlier server left; returns
        the number of rows recovered into the table."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another review server is using {self.folder} (one server per OUT)") from None
        self._lock_fd = fd
        return self.recover()

    def close(self) -> None:
        """Flush what is pending and release the folder."""
        try:
            self.flush()
        finally:
            with self._lock:
                if self._handle is not None:
                    self._handle.close()
                    self._handle = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def recover(self) -> int:
        """Write the rows of segments left by an earlier process, then delete those segments."""
        segments = sorted(p for p in self.folder.glob(_SEGMENT_GLOB) if p != self._segment)
        if not segments:
            return 0
        rows = [row for path in segments for row in self._read_segment(path)]
        written_ids = set(read_decisions(self.out, self.storage_options)["decision_id"])
        fresh = [row for row in rows if row["decision_id"] not in written_ids]
        if fresh:
            write_decisions(self.out, fresh, self.run_id, self.storage_options)
        for path in segments:
            path.unlink(missing_ok=True)
        logger.info("decision journal: %d decision(s) recovered from %d segment(s)", len(fresh), len(segments))
        return len(fresh)

    @staticmethod
    def _read_segment(path: Path) -> list[dict]:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # torn last line: written, never fsync-ed and acknowledged
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("decision journal %s: unreadable line skipped", path)
        return rows

    # -------------------------------------------------------------------- writing
    def append(self, row: Mapping[str, Any]) -> None:
        """Make ``row`` durable (append + fsync); call before acknowledging it."""
        line = json.dumps(row, default=_json_default, sort_keys=True) + "\n"
        with self._lock:
            if self._handle is None:
                self._segment = self.folder / f"segment-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
                self._handle = open(self._segment, "a", encoding="utf-8")
                _fsync_dir(self.folder)
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._pending.append(dict(row))
            if self._pending_since is None:
                self._pending_since = time.monotonic()

    def due(self, max_age_s: float) -> bool:
        """Whether a flush is due: ``flush_rows`` pending, or the oldest pending row older than ``max_age_s``."""
        with self._lock:
            if self._sealed:
                return True
            if not self._pending:
                return False
            return len(self._pending) >= self.flush_rows or time.monotonic() - self._pending_since >= max_age_s

    def flush(self) -> int:
        """Write every journaled row to the table (one file per model) and drop their segments.

        A failed write keeps the rows sealed (and on disk); the next flush tries them again.
        """
        with self._flush_lock:
            with self._lock:
                if self._pending:
                    self._handle.close()
                    self._sealed.append((self._segment, self._pending))
                    self._handle, self._segment, self._pending, self._pending_since = None, None, [], None
                batches = list(self._sealed)
            if not batches:
                return 0
            rows = [row for _, batch in batches for row in batch]
            write_decisions(self.out, rows, self.run_id, self.storage_options)
            for path, _ in batches:
                path.unlink(missing_ok=True)
            with self._lock:
                self._sealed = self._sealed[len(batches):]
            return len(rows)

    def unflushed(self) -> list[dict]:
        """Rows acknowledged but not yet in the table, oldest first."""
        with self._lock:
            return [row for _, batch in self._sealed for row in batch] + list(self._pending)
