"""Parquet output tables: schemas (defined once, here), writer and reader.

Layout::

    <OUT>/tables/<name>/model=<model_id, URL-encoded>/date=<YYYY-MM-DD>/part-<run_id>-<12 hex>.parquet

- One file per :func:`write_table` call, written atomically through ``infra.storage`` (readers
  never see a partial file; temporary names start with ``.`` and do not end in ``.parquet``, so
  pyarrow, pandas and DuckDB globs skip them).
- Hive partitions: ``model`` and ``date``. The files store ``model_id`` (the exact string, any
  characters) but not the partition keys, so there is never a column both in the file and in the
  path; a hive-aware reader (pyarrow.dataset, pandas, DuckDB ``hive_partitioning=true``) adds
  ``model`` (URL-decoded: equal to ``model_id``) and ``date`` columns. :func:`read_table` drops
  the redundant ``model`` and keeps ``date`` (string ``YYYY-MM-DD``, the UTC write date).
- Timestamps are ``timestamp[us, tz=UTC]``.

Adding a nullable column to a schema is backwards compatible: :func:`read_table` reads old files
with the column as null.

Damaged files: files are written with page checksums. A file whose footer or pages cannot be
read (cut short, overwritten) is *damaged*, never taken for absent without a word:
:func:`read_table` reads the other files and logs a WARNING naming it, :func:`parquet_problem`
says what is wrong with one file, and ``infra.verify`` moves damaged files to
``OUT/_pairx/quarantine/`` so that a run recomputes what they held.
"""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date as date_type
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pairx_core.errors import ConfigError, PairXError

from .storage import OutputLayout, StorageTarget, is_transient, safe_segment, with_retries

logger = logging.getLogger("pairx.tables")

__all__ = [
    "CompactedPartition",
    "DamagedTableError",
    "parquet_problem",
    "PARTITION_COLUMNS",
    "TABLE_SCHEMAS",
    "compact_table",
    "read_table",
    "ensure_table",
    "schema_markdown",
    "table_url",
    "with_nulls",
    "write_table",
]

class DamagedTableError(PairXError):
    """Some files of a table do not read (``read_table(..., damaged="raise")``)."""

    def __init__(self, table: str, damaged: Sequence[str]):
        self.table, self.damaged = table, list(damaged)
        super().__init__(f"table {table!r} has {len(self.damaged)} damaged file(s) ({'; '.join(self.damaged[:3])}); "
                         "`pairx verify OUT --repair` moves them aside (the next run recomputes what they held)")


_TS = pa.timestamp("us", tz="UTC")
_DESC = b"description"

#: Hive partition keys, in path order.
PARTITION_COLUMNS = ("model", "date")


def _f(name: str, dtype: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, dtype, nullable=nullable, metadata={_DESC: description.encode()})


def _ids(*, run: bool = True, created: bool = True) -> list[pa.Field]:
    fields = [_f("model_id", pa.string(), "model identifier (also the `model=` partition)", False)]
    if run:
        fields.append(_f("run_id", pa.string(), "pipeline run that wrote the row", False))
    if created:
        fields.append(_f("created_at", _TS, "when the row was written (UTC)", False))
    return fields


_MODEL_SPEC = _f("model_spec", pa.string(),
                 "model spec as typed, credentials removed (infra.model_store.redact_model_spec)")

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "pairs": pa.schema(
        [
            _f("pair_id", pa.string(), "identifier of the image pair", False),
            _f("image_0", pa.string(), "URI of the first (query) image", False),
            _f("image_1", pa.string(), "URI of the second (candidate) image", False),
            _f("layer", pa.string(), "layer whose features were matched and explained", False),
            _f("similarity", pa.float64(), "cosine similarity of the two embeddings"),
            _f("n_matches", pa.int32(), "number of feature matches kept"),
            _f("residual_px", pa.float64(), "mean reprojection error of the top matches under a RANSAC homography, "
                                            "input pixels (null when irm is)"),
            _f("inliers", pa.int32(), "RANSAC inliers (5 px) among the top matches (null when irm is)"),
            _f("irm", pa.float64(), "geometric consistency 1 / (1 + residual_px); null with fewer than 5 top "
                                    "matches or zero relevance among them"),
            _f("match_coverage", pa.float64(), "mean relevance of the top matches / (max R0 * max R1), in [0, 1]"),
            _f("relevance_share", pa.float64(), "share of total relevance at matched locations"),
            _f("match_share", pa.float64(), "mutual matches / feature-map cells"),
            _f("viz_uri", pa.string(),
               "URI of the PNG visualisation (null if not rendered); a URL under `public_url` when set"),
            _f("box_0", pa.list_(pa.float64()), "crop box x, y, w, h of image_0 as given (pixels or fractions; the "
               "nightly flow writes original pixels); null: whole image"),
            _f("box_1", pa.list_(pa.float64()), "crop box x, y, w, h of image_1 as given; null: whole image"),
            _f("theta_0", pa.float64(), "rotation of image_0 in radians, applied after the crop"),
            _f("theta_1", pa.float64(), "rotation of image_1 in radians, applied after the crop"),
            _MODEL_SPEC,
            *_ids(),
            _f("output_key", pa.string(), "idempotency key (infra.keys.pair_output_key)", False),
            _f("commit_id", pa.string(), "the batch write this row commits; its matches and picture carry the same "
                                         "id (join on output_key AND commit_id)"),
        ]
    ),
    "matches": pa.schema(
        [
            _f("pair_id", pa.string(), "pair the match belongs to", False),
            _f("layer", pa.string(), "layer whose features were matched", False),
            _f("rank", pa.int32(), "0-based rank of the match (best first)", False),
            _f("x_0", pa.float32(), "x in ORIGINAL pixels of image_0"),
            _f("y_0", pa.float32(), "y in ORIGINAL pixels of image_0"),
            _f("x_1", pa.float32(), "x in ORIGINAL pixels of image_1"),
            _f("y_1", pa.float32(), "y in ORIGINAL pixels of image_1"),
            _f("distance", pa.float32(), "feature distance of the match"),
            _f("relevance", pa.float32(), "relevance attributed to the match"),
            _f("model_id", pa.string(), "model identifier (also the `model=` partition)", False),
            _f("output_key", pa.string(), "output_key of the pairs row these matches belong to"),
            _f("commit_id", pa.string(), "batch write of these rows; they count only when a pairs row has the "
                                         "same commit_id (else an uncommitted orphan, removed by `pairx gc`)"),
        ]
    ),
    "errors": pa.schema(
        [
            _f("item", pa.string(), "what failed (image URI, pair id, ...)", False),
            _f("stage", pa.string(),
               "pipeline stage (input: a row refused before any read; load, embed, explain, render: its picture, "
               "write, ...)", False),
            _f("error_type", pa.string(), "exception class name", False),
            _f("message", pa.string(), "error message"),
            _f("content_hash", pa.string(), "SHA-256 of the file when the error is about its content (cannot be "
                                            "decoded, too small); later nights skip that content, not the path"),
            *_ids(),
        ]
    ),
    "images": pa.schema(
        [
            _f("image_uri", pa.string(), "URI of the image file", False),
            _f("content_hash", pa.string(), "SHA-256 of the file bytes", False),
            _f("width", pa.int32(), "width of the EXIF-upright image, pixels"),
            _f("height", pa.int32(), "height of the EXIF-upright image, pixels"),
            _f("model_id", pa.string(), "model identifier (also the `model=` partition)", False),
            _f("embedded_at", _TS, "when the embedding was computed (UTC)"),
            _f("run_id", pa.string(),
               "pipeline run that recorded the image (null in rows written before this column existed)"),
        ]
    ),
    "runs": pa.schema(
        [
            _f("run_id", pa.string(), "pipeline run identifier", False),
            _f("flow", pa.string(), "flow name", False),
            _f("parameters", pa.string(), "flow parameters as a JSON object"),
            _f("model_id", pa.string(), "model identifier (also the `model=` partition)", False),
            _f("n_done", pa.int64(), "pairs explained (a run stopped early: every pair its batches wrote)"),
            _f("n_skipped", pa.int64(), "items skipped (output already present)"),
            _f("n_failed", pa.int64(), "items that failed (see the errors table)"),
            _f("duration_s", pa.float64(), "wall-clock duration, seconds"),
            _f("started_at", _TS, "run start (UTC)"),
            _f("finished_at", _TS, "run end (UTC)"),
            _f("status", pa.string(), "completed, failed (some items failed), crashed (an error stopped the run), "
                                      "cancelled (Ctrl-C, SIGTERM, cancelled in Prefect) or refused (another run "
                                      "held the output's lease)"),
            _f("error", pa.string(), "what stopped a crashed or cancelled run"),
            _f("model_spec", pa.string(), "the model spec as given, credentials removed"),
            _f("weights_digest", pa.string(), "digest of the model's weights and architecture"),
            _f("random_weights", pa.bool_(), "whether the model ran with random weights (allowed explicitly)"),
            _f("workers", pa.list_(pa.string()), "Dask workers that explained this run's batches"),
            _f("cache_hits", pa.int64(), "images whose activations came from the cache"),
            _f("cache_misses", pa.int64(), "images whose activations were computed (and cached)"),
            _f("cache_damaged", pa.int64(), "cache entries that failed their checksum or value checks and were "
                                            "recomputed"),
            _f("n_repaired_files", pa.int64(),
               f"damaged table files the run moved to {OutputLayout.control_path('quarantine')}/ (their rows "
               "recomputed)"),
            _f("n_unsupported", pa.int64(),
               "files of the uploads folder that are not supported photos (HEIC, sidecars, ...): counted, not read"),
            _f("n_frames", pa.int64(), "camera-trap night (--detections): frames the detector file lists"),
            _f("n_empty", pa.int64(), "camera-trap night: frames without a kept detection (never read)"),
            _f("n_detections", pa.int64(), "camera-trap night: kept detections (one upload each)"),
            _f("n_retries", pa.int64(), "storage calls the run's own process retried after a transient error "
                                        "(throttling, timeouts); null in rows written before this column existed"),
        ]
    ),
    "candidates": pa.schema(
        [
            _f("query", pa.string(), "URI of the query image", False),
            _f("rank", pa.int32(), "0-based rank after re-ranking", False),
            _f("gallery_image", pa.string(), "URI of the gallery image", False),
            _f("individual", pa.string(), "individual id of the gallery image, if known"),
            _f("similarity", pa.float64(), "cosine similarity of the embeddings"),
            _f("irm", pa.float64(), "IRM of the pair at the first layer (stage 1 when re-ranking, equal to the full "
                                    "explanation's; null if not judged)"),
            _f("rerank_score", pa.float64(), "score used for the final ranking (similarity alone for every "
                                             "candidate of a query when any irm is null)"),
            _f("pair_id", pa.string(), "pair explained for this candidate (joins `pairs` and `matches`)"),
            _f("layer", pa.string(), "layer whose IRM ranked the candidate (the first explained layer)"),
            _f("viz_uri", pa.string(),
               "URI of the pair's PAIR-X picture at `layer` (a URL under `public_url` when set)"),
            _f("output_key", pa.string(), "`pairs.output_key` of the explanation used (exact join key)"),
            _MODEL_SPEC,
            _f("retrieval_rank", pa.int32(),
               "0-based rank by cosine similarity before re-ranking (null without re-ranking)"),
            _f("explained", pa.bool_(),
               "whether the pair was explained in full (pixel maps, picture); null without re-ranking"),
            _f("top_k", pa.int32(), "the night's `top_k`: rows with `rank` below it are the candidates chosen for "
               "review (an explained row ranked lower was displaced by re-ranking); null in older rows"),
            _f("n_matches", pa.int32(), "stage 1 (from cached activations): mutual matches at `layer`"),
            _f("inliers", pa.int32(), "stage 1: RANSAC inliers among the top matches"),
            _f("residual_px", pa.float64(), "stage 1: mean homography residual of the top matches, pixels"),
            _f("match_coverage", pa.float64(), "stage 1: normalised mean relevance of the top matches"),
            _f("relevance_share", pa.float64(), "stage 1: share of the relevance on matched cells"),
            _f("match_share", pa.float64(), "stage 1: mutual matches / cells"),
            _f("query_hash", pa.string(), "SHA-256 of the query's bytes when ranked: an upload is done per name and "
               "content (null in rows written before this column existed)"),
            _f("query_detection", pa.int32(), "index of the query's detection in its photo's list of the detector "
               "file (null: the whole photo was the upload)"),
            _f("query_detection_id", pa.string(), "stable identity of that detection (photo content, index, box): "
               "a rerun skips it, a moved box redoes it"),
            _f("query_box", pa.list_(pa.float64()),
               "the query's crop x, y, w, h in original (upright) pixels; null: the whole photo"),
            _f("detection_conf", pa.float64(), "detector confidence of the query's detection"),
            _f("species", pa.string(), "top classification of the query's detection, when the detector file has one"),
            _f("gallery_source", pa.string(), "where the gallery image came from: `gallery` (folder or manifest) or "
               "`confirmed` (an upload of an earlier night confirmed by a reviewer)"),
            *_ids(),
        ]
    ),
    "decisions": pa.schema(
        [
            _f("decision_id", pa.string(), "identifier of the decision (a recovered journal entry is written once)",
               False),
            _f("query", pa.string(), "URI of the upload decided on (the `candidates.query`)", False),
            _f("content_hash", pa.string(), "SHA-256 of the upload's file (from `images`; null if not recorded)"),
            _f("box", pa.list_(pa.float64()), "crop box x, y, w, h of the upload as explained; null: whole image"),
            _f("detection_id", pa.string(), "the detection decided on (`candidates.query_detection_id`) when the "
               "night ranked the photo's detections one by one; null: the whole photo"),
            _f("decision", pa.string(), "`match`, `new_individual`, `no_match`, `unsure`, or `undo` (withdraws the "
                                        "decision `supersedes` names: the upload is pending again)", False),
            _f("individual", pa.string(),
               "the individual decided (`match`: the candidate's, `new_individual`: the new name)"),
            _f("gallery_image", pa.string(), "`match`: URI of the accepted candidate (null when the individual was "
                                             "named without one of the upload's candidates)"),
            _f("rank", pa.int32(), "0-based rank of the accepted candidate after re-ranking"),
            _f("retrieval_rank", pa.int32(), "0-based rank of the accepted candidate by similarity alone"),
            _f("similarity", pa.float64(), "cosine similarity of the accepted candidate at decision time"),
            _f("irm", pa.float64(), "IRM of the accepted candidate at decision time"),
            _f("rerank_score", pa.float64(), "re-rank score of the accepted candidate at decision time"),
            _f("night_run_id", pa.string(), "run (night) whose candidates the decision was made on", False),
            _f("reviewer", pa.string(), "who decided", False),
            _f("decided_at", _TS, "when the decision was made (UTC); the latest per upload (`query`, "
               "`content_hash`, `detection_id`) counts", False),
            _f("supersedes", pa.string(), "`decision_id` of the upload's decision this one replaces (null: first)"),
            _f("note", pa.string(), "free text from the reviewer"),
            *_ids(),
        ]
    ),
}

_AUTO_COLUMNS = ("model_id", "run_id", "created_at")
_JSON_COLUMNS = ("parameters",)


def _schema(name: str) -> pa.Schema:
    try:
        return TABLE_SCHEMAS[name]
    except KeyError:
        raise ConfigError(f"unknown table {name!r}; known: {sorted(TABLE_SCHEMAS)}") from None


#: hex digits that tell apart the files one run writes to one table partition
_PART_ID_LENGTH = 12


def _part_prefix(run_id: str) -> str:
    """Start of the name of every file run ``run_id`` writes to a table."""
    return f"part-{safe_segment(run_id)}-"


def _model_segment(model_id: str) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"model_id must be a non-empty string, got {model_id!r}")
    return "model=" + urllib.parse.quote(model_id, safe="")


def _date_segment(date: str | date_type | datetime | None) -> str:
    if date is None:
        value = datetime.now(timezone.utc).date()
    elif isinstance(date, datetime):
        value = date.astimezone(timezone.utc).date() if date.tzinfo else date.date()
    elif isinstance(date, date_type):
        value = date
    else:
        try:
            value = date_type.fromisoformat(str(date))
        except ValueError:
            raise ConfigError(f"date must be YYYY-MM-DD, got {date!r}") from None
    return f"date={value.isoformat()}"


def table_url(out_url: str, name: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """URL of table ``name``'s dataset folder: ``<OUT>/tables/<name>``."""
    _schema(name)
    return StorageTarget.from_url(out_url, storage_options).layout.table(name)


def _to_utc(value: Any, column: str) -> Any:
    if value is None or isinstance(value, pd.Timestamp) and pd.isna(value):
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{column}: not an ISO timestamp: {value!r}") from None
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema, name: str) -> pa.Table:
    keys: set[str] = set()
    for row in rows:
        if not isinstance(row, Mapping):
            raise ConfigError(f"table {name!r}: rows must be dicts, got {type(row).__name__}")
        keys.update(row)
    _check_columns(keys, schema, name)
    timestamp_cols = [f.name for f in schema if pa.types.is_timestamp(f.type)]
    prepared = []
    for row in rows:
        fixed = dict(row)
        for col in timestamp_cols:
            if col in fixed:
                fixed[col] = _to_utc(fixed[col], col)
        for col in _JSON_COLUMNS:
            if col in fixed and isinstance(fixed[col], (Mapping, list, tuple)):
                fixed[col] = json.dumps(fixed[col], sort_keys=True, default=str)
        prepared.append(fixed)
    present = [f for f in schema if f.name in keys]
    try:
        return pa.Table.from_pylist(prepared, schema=pa.schema(present))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"table {name!r}: rows do not fit the schema ({exc})") from None


def _check_columns(columns: set[str], schema: pa.Schema, name: str) -> None:
    missing = [f.name for f in schema if f.name not in columns and f.name not in _AUTO_COLUMNS]
    extra = sorted(c for c in columns if c not in schema.names)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unknown columns {extra}")
        raise ConfigError(f"table {name!r}: " + "; ".join(parts) + f" (schema: {schema.names})")


def _fill_and_cast(table: pa.Table, schema: pa.Schema, name: str, model_id: str, run_id: str) -> pa.Table:
    n = table.num_rows
    fills = {"model_id": model_id, "run_id": run_id, "created_at": datetime.now(timezone.utc)}
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table[field.name]
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ConfigError(f"table {name!r}: column {field.name!r} cannot be {field.type} ({exc})") from None
        elif field.name in fills:
            column = pa.array([fills[field.name]] * n, type=field.type)
        else:  # pragma: no cover - _check_columns guarantees presence
            raise ConfigError(f"table {name!r}: missing column {field.name!r}")
        if not field.nullable and column.null_count:
            raise ConfigError(f"table {name!r}: column {field.name!r} has {column.null_count} null value(s)")
        columns.append(column)
    result = pa.Table.from_arrays(columns, schema=schema)
    if "model_id" in schema.names:
        values = set(result["model_id"].to_pylist())
        if values - {model_id}:
            raise ConfigError(
                f"table {name!r}: rows have model_id {sorted(values - {model_id})} but are written "
                f"under model_id={model_id!r}"
            )
    return result


def write_table(
    out_url: str,
    name: str,
    rows: Sequence[Mapping[str, Any]] | pa.Table | pd.DataFrame,
    model_id: str,
    run_id: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    date: str | date_type | datetime | None = None,
) -> str | None:
    """Validate ``rows`` against table ``name``'s schema and write one Parquet file atomically.

    Args:
        out_url: output root ``<OUT>`` (any fsspec URL).
        name: a key of :data:`TABLE_SCHEMAS`.
        rows: list of dicts, a ``pyarrow.Table`` or a ``pandas.DataFrame``. Every schema column
            must be present (value may be None where nullable) except ``model_id``, ``run_id``
            and ``created_at``, filled from the arguments / the current UTC time when absent.
            Timestamps may be datetimes (naive = UTC) or ISO strings; ``parameters`` may be a
            dict (stored as JSON).
        model_id: partition and ``model_id`` column value.
        run_id: goes into the file name (and the ``run_id`` column when absent).
        date: partition date (default: today, UTC).

    Returns:
        URL of the file written, or None when ``rows`` is empty (nothing is written).

    Raises:
        ConfigError: unknown table, missing/unknown columns, nulls in required columns, values
            of the wrong type, or a ``model_id`` column that disagrees with ``model_id``.
    """
    schema = _schema(name)
    partition = f"{_model_segment(model_id)}/{_date_segment(date)}"
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
    if isinstance(rows, pd.DataFrame):
        try:
            rows = pa.Table.from_pandas(rows, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ConfigError(f"table {name!r}: DataFrame does not convert to Arrow ({exc})") from None
    if isinstance(rows, pa.Table):
        _check_columns(set(rows.column_names), schema, name)
        table = rows
    else:
        rows = list(rows)
        if not rows:
            return None
        table = _rows_to_table(rows, schema, name)
    if table.num_rows == 0:
        return None
    table = _fill_and_cast(table, schema, name, model_id, run_id)

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", write_page_checksum=True)
    target = StorageTarget.from_url(out_url, storage_options)
    filename = f"{_part_prefix(run_id)}{uuid.uuid4().hex[:_PART_ID_LENGTH]}.parquet"
    return target.write_bytes_atomic(f"{OutputLayout.table_path(name)}/{partition}/{filename}", buffer.getvalue())


def count_run_rows(
    out_url: str, name: str, model_id: str, run_id: str, storage_options: Mapping[str, Any] | None = None
) -> int:
    """Rows that run ``run_id`` has written to table ``name`` so far (Parquet footers only).

    A run stopped mid-way (Ctrl-C, SIGTERM, a crash) records this as its ``n_done``: batches that
    finished writing before the flow gathered their results still count.
    """
    _schema(name)
    target = StorageTarget.from_url(out_url, storage_options)
    prefix = _part_prefix(run_id)
    # exactly write_table's names for this run (not those of a run whose id starts with this one's)
    written = re.compile(re.escape(prefix) + f"[0-9a-f]{{{_PART_ID_LENGTH}}}\\.parquet")
    total = 0
    for url in target.glob(f"{OutputLayout.table_path(name)}/{_model_segment(model_id)}/*/{prefix}*.parquet"):
        if not written.fullmatch(url.rsplit("/", 1)[-1]):
            continue
        try:
            with target.open(url) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        except Exception as error:  # noqa: BLE001 - a damaged file holds no rows anyone can read
            if is_transient(error) or isinstance(error, FileNotFoundError):
                raise
            logger.warning("damaged table file (not counted): %s: %s", url, error)
    return total


def parquet_problem(url: str, storage_options: Mapping[str, Any] | None = None, *, pages: bool = True) -> str | None:
    """What makes the Parquet file at ``url`` unreadable, or None when it reads.

    Reads the footer and, with ``pages``, every row group (page checksums verified where the file
    has them). Transient storage errors and a file that vanished meanwhile are raised, not
    reported: they say nothing about the file.
    """
    target = StorageTarget.from_url(url, storage_options)
    try:
        with target.open(url) as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            if pages:
                for group in range(parquet.num_row_groups):
                    parquet.read_row_group(group)
    except Exception as error:  # noqa: BLE001 - Arrow reports damage as ArrowInvalid, OSError, ...
        if is_transient(error) or isinstance(error, FileNotFoundError) or _vanished(error):
            raise
        return f"{type(error).__name__}: {error}"[:500]
    return None


def _vanished(error: BaseException) -> bool:
    from pairx_core.errors import StorageError

    return isinstance(error, StorageError) and "not found" in str(error)


def ensure_table(
    out_url: str, name: str, model_id: str, run_id: str, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """Write an empty file of table ``name`` when the table has none yet; return its URL or None.

    So that ``read_parquet('<OUT>/tables/errors/**/*.parquet')`` in DuckDB, pandas or pyarrow
    returns zero rows on a night without errors instead of failing on an empty glob.
    """
    schema = _schema(name)
    target = StorageTarget.from_url(out_url, storage_options)
    if target.glob(f"{OutputLayout.table_path(name)}/*/*/*.parquet"):
        return None
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table(), buffer, compression="zstd")
    partition = f"{_model_segment(model_id)}/{_date_segment(None)}"
    filename = f"{_part_prefix(run_id)}empty.parquet"
    return target.write_bytes_atomic(f"{OutputLayout.table_path(name)}/{partition}/{filename}", buffer.getvalue())


def with_nulls(name: str, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """``rows`` with every nullable column of table ``name`` they lack set to None.

    :func:`write_table` wants every column named (a forgotten column is a bug it reports); use
    this where leaving the optional columns empty is what you mean (benchmarks, fixtures).
    """
    nullable = [f.name for f in _schema(name) if f.nullable]
    return [{**{column: None for column in nullable}, **row} for row in rows]


def _dataset_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(list(schema) + [pa.field(c, pa.string()) for c in PARTITION_COLUMNS])


def _empty_frame(schema: pa.Schema, columns: Sequence[str] | None) -> pd.DataFrame:
    full = _dataset_schema(schema)
    names = list(columns) if columns is not None else [n for n in full.names if n != "model"]
    return full.empty_table().select(names).to_pandas()


def read_table(
    out_url: str,
    name: str,
    filters: Any = None,
    *,
    model_id: str | None = None,
    columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    damaged: str = "skip",
) -> pd.DataFrame:
    """Read table ``name`` under ``<OUT>`` as one DataFrame (all partitions, all files).

    Args:
        filters: pyarrow/pandas style DNF filters (``[("layer", "==", "blocks.3")]``) or a
            ``pyarrow.compute.Expression``; may use the partition columns ``model`` and ``date``.
        model_id: only this model (prunes partitions).
        columns: columns to return (default: schema columns plus ``date``).
        damaged: a file whose footer or pages do not read: ``"skip"`` it with a WARNING naming it
            (its rows are absent: a run recomputes them) or ``"raise"`` :class:`DamagedTableError`.

    Returns:
        DataFrame with the schema's columns (+ ``date``); empty when nothing was written yet.
    """
    schema = _schema(name)
    full = _dataset_schema(schema)
    if columns is not None:
        unknown = [c for c in columns if c not in full.names]
        if unknown:
            raise ConfigError(f"table {name!r}: unknown columns {unknown}")
    target = StorageTarget.from_url(out_url, storage_options).child(OutputLayout.table_path(name))
    if not target.exists():
        return _empty_frame(schema, columns)
    if damaged not in ("skip", "raise"):
        raise ConfigError(f"damaged must be 'skip' or 'raise', got {damaged!r}")
    return with_retries(_read_dataset, target, full, filters, model_id, columns, name, damaged)


#: verify page checksums where files have them (every file this module writes)
_CHECKED_PAGES = ds.ParquetFragmentScanOptions(page_checksum_verification=True)


def _read_dataset(target: StorageTarget, full: pa.Schema, filters: Any, model_id: str | None,
                  columns: Sequence[str] | None, name: str, damaged: str) -> pd.DataFrame:
    """One attempt at reading a table's dataset (listing + files), retried as a whole."""
    partitioning = ds.partitioning(
        pa.schema([pa.field(c, pa.string()) for c in PARTITION_COLUMNS]), flavor="hive"
    )
    if target.is_local:
        dataset = ds.dataset(target.root, format="parquet", partitioning=partitioning, schema=full)
    else:
        fs = target.filesystem()
        fs.invalidate_cache()  # a retry must list again
        dataset = ds.dataset(
            target.raw_path(),
            filesystem=fs,
            format="parquet",
            partitioning=partitioning,
            schema=full,
        )
    expression = None
    if filters is not None:
        expression = filters if isinstance(filters, ds.Expression) else pq.filters_to_expression(filters)
    if model_id is not None:
        by_model = ds.field("model") == model_id
        expression = by_model if expression is None else expression & by_model
    names = list(columns) if columns is not None else [n for n in full.names if n != "model"]
    try:
        table = dataset.to_table(columns=names, filter=expression, fragment_scan_options=_CHECKED_PAGES)
    except Exception as error:  # noqa: BLE001 - Arrow reports damage as ArrowInvalid, OSError, ...
        if is_transient(error) or isinstance(error, FileNotFoundError):
            raise
        table = _read_readable_files(dataset, partitioning, target, full, names, expression, name, damaged)
    return table.to_pandas()


def _read_readable_files(dataset: ds.FileSystemDataset, partitioning: Any, target: StorageTarget, full: pa.Schema,
                         names: list[str], expression: Any, name: str, on_damaged: str) -> pa.Table:
    """The rows of every file that reads, file by file; damaged files are named in a WARNING."""
    base = target.root if target.is_local else target.raw_path()
    tables, damaged = [], []
    for path in dataset.files:
        one = ds.dataset([path], filesystem=dataset.filesystem, format="parquet", partitioning=partitioning,
                         partition_base_dir=base, schema=full)
        try:
            tables.append(one.to_table(columns=names, filter=expression, fragment_scan_options=_CHECKED_PAGES))
        except Exception as error:  # noqa: BLE001
            if is_transient(error) or isinstance(error, FileNotFoundError):
                raise
            url = path if target.is_local else target.filesystem().unstrip_protocol(path)
            if parquet_problem(url, target.storage_options or None) is None:
                raise  # the file reads: not damage (e.g. a column of another type)
            damaged.append(f"{path} ({type(error).__name__}: {str(error)[:200]})")
    if damaged and on_damaged == "raise":
        raise DamagedTableError(name, damaged)
    if damaged:
        logger.warning("table %s: %d damaged file(s) skipped, their rows are unreadable (`pairx verify OUT --repair` "
                       "moves them aside; the next run recomputes them): %s", name, len(damaged),
                       "; ".join(damaged[:5]))
    if not tables:
        return full.empty_table().select(names)
    return pa.concat_tables(tables)


def schema_markdown() -> str:
    """Markdown documentation of every table (for the README "Outputs" section)."""
    lines = [
        "Partition columns added by hive-aware readers: `model` (= `model_id`) and `date`",
        "(`YYYY-MM-DD`, UTC write date). Not-null columns are marked *required*.",
        "",
    ]
    for name, schema in TABLE_SCHEMAS.items():
        lines += [f"### `{name}`", "", "| column | type | required | description |", "|---|---|---|---|"]
        for field in schema:
            meta = field.metadata or {}
            description = meta.get(_DESC, b"").decode()
            required = "yes" if not field.nullable else ""
            lines.append(f"| `{field.name}` | `{field.type}` | {required} | {description} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------ compaction
@dataclass(frozen=True)
class CompactedPartition:
    """One partition rewritten by :func:`compact_table`."""

    partition: str  # "model=<...>/date=<...>"
    files_before: int
    bytes_before: int
    bytes_after: int
    rows: int


def _exchange_directories(a: str, b: str) -> None:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise ConfigError("compact_table needs renameat2 (Linux) to swap partitions atomically")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot exchange {a} and {b} atomically: {os.strerror(errno)}")


def compact_table(
    out_url: str,
    name: str,
    *,
    model_id: str | None = None,
    before: str | date_type | None = None,
    min_files: int = 2,
    storage_options: Mapping[str, Any] | None = None,
) -> list[CompactedPartition]:
    """Rewrite every partition of table ``name`` that holds ``min_files`` files or more into one file.

    Each ``model=/date=`` folder is rebuilt beside itself (a hidden ``.compact-*`` folder with one
    Parquet file: the rows of all files, in file-name order, cast to the current schema) and the
    two folders are then exchanged in ONE atomic rename, so a reader lists either all the old
    files or the single new one: never duplicates. A read that listed the old files just before the
    swap fails with a missing-file error, and rarely (once in ~10 test runs on a loaded machine) one
    racing the swap sees the partition empty: readers that run during a compaction retry both. Files that a
    writer added to the partition while it was being compacted are moved back, not lost; by
    default only past dates are compacted (``before`` = today, UTC), which nightly runs no longer
    write to.

    Args:
        model_id: only this model's partitions (default: all).
        before: compact dates strictly before this one (``YYYY-MM-DD``; default: today, UTC).
        min_files: partitions with fewer files are left alone.

    Returns:
        the partitions rewritten.

    Raises:
        ConfigError: unknown table, a remote table (object stores and most remote filesystems
            cannot swap a folder atomically), or no atomic exchange on this system.
    """
    import os

    schema = _schema(name)
    if min_files < 2:
        raise ConfigError(f"min_files must be >= 2, got {min_files}")
    target = StorageTarget.from_url(out_url, storage_options).child(OutputLayout.table_path(name))
    if not target.is_local:
        raise ConfigError(
            f"compact_table rewrites partitions with an atomic folder swap, which {target.protocol!r} storage does "
            "not offer; compact a local copy, or batch the writes instead"
        )
    root = target.root
    if not os.path.isdir(root):
        return []
    cutoff = _date_segment(before).partition("=")[2]
    model_dirs = sorted(d for d in os.listdir(root) if d.startswith("model="))
    if model_id is not None:
        model_dirs = [d for d in model_dirs if d == _model_segment(model_id)]
    done: list[CompactedPartition] = []
    for model_dir in model_dirs:
        model_path = os.path.join(root, model_dir)
        for date_dir in sorted(d for d in os.listdir(model_path) if d.startswith("date=")):
            if date_dir.partition("=")[2] >= cutoff:
                continue
            result = _compact_partition(model_path, date_dir, schema, min_files)
            if result is not None:
                done.append(CompactedPartition(f"{model_dir}/{date_dir}", *result))
    return done


def _visible_parquet(folder: str) -> list[str]:
    import os

    return sorted(f for f in os.listdir(folder) if f.endswith(".parquet") and not f.startswith((".", "_")))


def _compact_partition(model_path: str, date_dir: str, schema: pa.Schema, min_files: int):
    import os
    import shutil

    partition = os.path.join(model_path, date_dir)
    files = _visible_parquet(partition)
    if len(files) < min_files:
        return None
    paths = [os.path.join(partition, f) for f in files]
    bytes_before = sum(os.path.getsize(p) for p in paths)
    # the dataset API reads older files (fewer nullable columns) into the current schema
    table = ds.dataset(paths, format="parquet", schema=schema).to_table()
    staging = os.path.join(model_path, f".compact-{date_dir}-{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    try:
        compacted = os.path.join(staging, f"part-compacted-{uuid.uuid4().hex[:12]}.parquet")
        pq.write_table(table, compacted, compression="zstd", write_page_checksum=True)
        with open(compacted, "rb") as handle:
            os.fsync(handle.fileno())
        _exchange_directories(staging, partition)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # ``staging`` now holds the old files: anything written meanwhile goes back, the rest goes
    for late in sorted(set(_visible_parquet(staging)) - set(files)):
        os.replace(os.path.join(staging, late), os.path.join(partition, late))
    shutil.rmtree(staging, ignore_errors=True)
    bytes_after = os.path.getsize(os.path.join(partition, os.path.basename(compacted)))
    return len(files), bytes_before, bytes_after, table.num_rows
