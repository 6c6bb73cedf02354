"""Check an output root without changing it, and move damaged table files aside.

- :func:`damaged_table_files`: every Parquet file under ``OUT/tables`` whose footer or pages do
  not read (``infra.tables.parquet_problem``).
- :func:`quarantine`: moves such files to ``OUT/_pairx/quarantine/<same path under OUT>``
  (one rename on a local disk; copy then delete on object stores), keeping their names. The rows
  they held become absent, so the next planning treats their pairs, candidates and errors as not
  done and recomputes them; the files stay there for inspection (delete them by hand).
- :func:`quarantine_damaged`: that, plus what depended on them: ``pairs`` files whose matches
  were in a quarantined ``matches`` file, and ``candidates`` files that point to rows of a
  quarantined ``pairs`` file (their pairs and uploads would otherwise stay "done", incomplete).
- :func:`repair_tables`: find and quarantine, what a run does under the output's lease before it
  plans; :func:`needs_repair` is the check of the quiet-night short path.
- :func:`verify_output`: tables, cache checksums and picture references, for ``pairx verify``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .storage import OutputLayout, StorageTarget, storage_errors
from .tables import TABLE_SCHEMAS, parquet_problem, read_table

__all__ = ["QUARANTINE_DIR", "DamagedFile", "VerifyReport", "damaged_table_files", "needs_repair", "quarantine",
           "quarantine_damaged", "repair_tables", "require_output_root", "stale_candidate_files", "stale_pairs_files",
           "verify_output"]

logger = logging.getLogger("pairx.verify")

QUARANTINE_DIR = OutputLayout.control_path("quarantine")
#: files checked at once (reads of a remote store overlap)
_CHECK_THREADS = 8


@dataclass(frozen=True)
class DamagedFile:
    """A file that does not read: its URL and what the reader said."""

    url: str
    reason: str


@dataclass
class VerifyReport:
    """What :func:`verify_output` found (and, with ``repair``, moved aside)."""

    table_files: int = 0
    damaged_tables: list[DamagedFile] = field(default_factory=list)
    cache_entries: int = 0
    damaged_cache: list[str] = field(default_factory=list)
    pictures: int = 0
    missing_pictures: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.damaged_tables or self.damaged_cache or self.missing_pictures)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "table_files": self.table_files,
                "damaged_tables": [{"url": d.url, "reason": d.reason} for d in self.damaged_tables],
                "cache_entries": self.cache_entries, "damaged_cache": self.damaged_cache,
                "pictures": self.pictures, "missing_pictures": self.missing_pictures,
                "quarantined": self.quarantined}


def _table_files(target: StorageTarget) -> list[str]:
    return [url for name in TABLE_SCHEMAS
            for url in target.list_files(OutputLayout.table_path(name), suffixes=[".parquet"])]


def damaged_table_files(out: str, storage_options: Mapping[str, Any] | None = None) -> list[DamagedFile]:
    """Table files under ``out`` that do not read in full (footer and every page)."""
    from concurrent.futures import ThreadPoolExecutor

    target = StorageTarget.from_url(out, storage_options)
    files = _table_files(target)
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:  # Arrow decodes without the GIL; S3 waits
        problems = list(pool.map(lambda url: parquet_problem(url, storage_options), files))
    return [DamagedFile(url, problem) for url, problem in zip(files, problems) if problem is not None]


def _relative(target: StorageTarget, url: str) -> str:
    root = target.root.rstrip("/") + "/"
    if not url.startswith(root):
        raise ValueError(f"{url} is not under {target.root}")
    return url[len(root):]


def quarantine(out: str, urls: list[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Move ``urls`` (files under ``out``) to ``OUT/_pairx/quarantine/`` keeping their paths; returns the new URLs."""
    target = StorageTarget.from_url(out, storage_options)
    moved = []
    for url in urls:
        destination = target.url(f"{QUARANTINE_DIR}/{_relative(target, url)}")
        with storage_errors(url):
            if target.is_local:
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                os.replace(url, destination)  # same file system: atomic
            else:
                fs = target.filesystem()
                fs.copy(target.raw_path(url), target.raw_path(destination))
                fs.rm(target.raw_path(url))
        moved.append(destination)
    return moved


def stale_candidate_files(out: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """``candidates`` files with a row whose ``output_key`` no readable ``pairs`` row has.

    A candidates row gets its ``output_key`` from a pairs row; when that row's file was moved aside,
    the upload's candidates would keep it "done" and its lost pairs would never be recomputed.
    """
    import pyarrow.parquet as pq

    target = StorageTarget.from_url(out, storage_options)
    keys = set(read_table(out, "pairs", columns=["output_key"], storage_options=storage_options)["output_key"])
    stale = []
    for url in target.list_files(OutputLayout.table_path("candidates"), suffixes=[".parquet"]):
        with target.open(url) as handle:
            used = pq.read_table(handle, columns=["output_key"])["output_key"].drop_null().to_pylist()
        if set(used) - keys:
            stale.append(url)
    return stale


def _model_folder(url: str) -> str | None:
    """The ``model=...`` segment of a table file's URL."""
    return next((part for part in url.split("/") if part.startswith("model=")), None)


def stale_pairs_files(out: str, models: set[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """``pairs`` files (under the ``model=`` folders ``models``) with a row whose matches are all gone.

    A batch writes its matches and its pairs rows under one ``commit_id``; a pairs row with
    ``n_matches`` > 0 whose commit has no ``matches`` row left lost them with a quarantined
    matches file. (A run with ``k_lines`` 0 writes no matches: its pairs are recomputed too, at
    worst, the same.)
    """
    import pyarrow.parquet as pq

    target = StorageTarget.from_url(out, storage_options)
    present = set(read_table(out, "matches", columns=["commit_id"], storage_options=storage_options)
                  ["commit_id"].dropna())
    stale = []
    for url in target.list_files(OutputLayout.table_path("pairs"), suffixes=[".parquet"]):
        if _model_folder(url) not in models:
            continue
        with target.open(url) as handle:
            rows = pq.read_table(handle, columns=["commit_id", "n_matches"]).to_pandas()
        rows = rows[rows.commit_id.notna() & (rows.n_matches.fillna(0) > 0)]
        if not set(rows.commit_id) <= present:
            stale.append(url)
    return stale


def quarantine_damaged(out: str, damaged: list[DamagedFile],
                       storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Move ``damaged`` files aside, then what depended on them: the pairs files whose matches were in a
    moved matches file, and the candidates files that point to rows of a moved pairs file (so that
    those pairs are explained again and their uploads planned again). Returns the new URLs."""
    if not damaged:
        return []
    moved = quarantine(out, [d.url for d in damaged], storage_options)
    logger.warning("%d damaged table file(s) moved to %s/%s; what they held is recomputed: %s", len(damaged),
                   out.rstrip("/"), QUARANTINE_DIR, "; ".join(f"{d.url} ({d.reason[:120]})" for d in damaged[:5]))
    pairs_moved = any(f"/{OutputLayout.table_path('pairs')}/" in d.url for d in damaged)
    lost_matches = {_model_folder(d.url) for d in damaged if f"/{OutputLayout.table_path('matches')}/" in d.url}
    if lost_matches:
        stale_pairs = stale_pairs_files(out, lost_matches, storage_options)
        if stale_pairs:
            moved += quarantine(out, stale_pairs, storage_options)
            pairs_moved = True
            logger.warning("%d pairs file(s) whose matches were in those files moved aside too; their pairs are "
                           "recomputed: %s", len(stale_pairs), "; ".join(stale_pairs[:5]))
    if pairs_moved:
        stale = stale_candidate_files(out, storage_options)
        if stale:
            moved += quarantine(out, stale, storage_options)
            logger.warning("%d candidates file(s) pointing to those pairs moved aside too; their uploads are planned "
                           "again: %s", len(stale), "; ".join(stale[:5]))
    return moved


def repair_tables(out: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Quarantine every damaged table file under ``out`` (:func:`quarantine_damaged`); returns the
    damaged files' original URLs.

    Call it holding the output's lease (a run does, before it plans): the rows those files held
    are then absent and planned again.
    """
    damaged = damaged_table_files(out, storage_options)
    quarantine_damaged(out, damaged, storage_options)
    return [d.url for d in damaged]


def needs_repair(out: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a ``pairs`` or ``candidates`` file (the tables that say what is done) does not read in full."""
    from concurrent.futures import ThreadPoolExecutor

    target = StorageTarget.from_url(out, storage_options)
    files = [url for name in ("pairs", "candidates")
             for url in target.list_files(OutputLayout.table_path(name), suffixes=[".parquet"])]
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        problems = pool.map(lambda url: parquet_problem(url, storage_options), files)
        return any(problem is not None for problem in problems)


def _picture_path(uri: str, target: StorageTarget) -> str | None:
    """Where a ``viz_uri`` lives under OUT (``viz/...``), also when it is a URL under a public URL."""
    root = target.root.rstrip("/") + "/"
    if uri.startswith(root):
        return uri[len(root):]
    folder = f"/{OutputLayout.VIZ}/"
    marker = uri.rfind(folder)
    return OutputLayout.VIZ + uri[marker + len(folder) - 1:] if marker >= 0 else None


def missing_pictures(out: str, storage_options: Mapping[str, Any] | None = None) -> tuple[int, list[str]]:
    """``(pictures referenced, references whose file is absent)`` over ``pairs`` and ``candidates``."""
    target = StorageTarget.from_url(out, storage_options)
    present = {_relative(target, url) for url in target.list_files(OutputLayout.VIZ)}
    referenced: set[str] = set()
    for name in ("pairs", "candidates"):
        frame = read_table(out, name, columns=["viz_uri"], storage_options=storage_options)
        referenced.update(frame["viz_uri"].dropna())
    missing = sorted(uri for uri in referenced if _picture_path(uri, target) not in present)
    return len(referenced), missing


def _cache_roots(target: StorageTarget, cache: str | None) -> str:
    return cache or target.layout.cache


def verify_output(out: str, *, repair: bool = False, cache: str | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check every table file, the cache's checksums and the picture references of ``out``.

    Without ``repair`` nothing is changed; with it, damaged table files are quarantined (hold the
    output's lease meanwhile: ``pairx verify`` does).
    """
    from .cache_admin import damaged_cache_entries

    target = StorageTarget.from_url(out, storage_options)
    report = VerifyReport()
    report.table_files = len(_table_files(target))
    report.damaged_tables = damaged_table_files(out, storage_options)
    report.cache_entries, report.damaged_cache = damaged_cache_entries(_cache_roots(target, cache), storage_options)
    report.pictures, report.missing_pictures = missing_pictures(out, storage_options)
    if repair and report.damaged_tables:
        report.quarantined = quarantine_damaged(out, report.damaged_tables, storage_options)
    return report


def require_output_root(out: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise ConfigError unless ``out`` holds a pairx output (``tables/`` or ``_pairx/``); creates nothing."""
    from pairx_core.errors import ConfigError

    target = StorageTarget.from_url(out, storage_options)
    if not (target.exists(OutputLayout.TABLES) or target.exists(OutputLayout.CONTROL)):
        raise ConfigError(f"{target.root}: not a pairx output root: no {OutputLayout.TABLES}/ or "
                          f"{OutputLayout.CONTROL}/")
