"""DuckDB views over the output tables (``infra/views.sql``), for dashboards and ad-hoc queries.

``create_views(duckdb.connect(), OUT)`` defines one view per table (``pairs``, ``matches``,
``candidates``, ``errors``, ``runs``, ``images_all``) over ``OUT/tables/<name>/**/*.parquet``
with hive partitions (``model``, ``date``) and ``union_by_name`` (older files lack newer
columns), then the views of ``views.sql`` (``images``, ``pair_matches``, ``candidate_review``,
``nights``). A table with no file yet becomes an empty view with the schema's columns, so the
views always exist. DuckDB reads ``s3://`` through its ``httpfs`` extension (load it and create
a secret on the connection first).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from .storage import StorageTarget
from .tables import TABLE_SCHEMAS

__all__ = ["VIEWS_SQL", "create_views", "views_sql"]

VIEWS_SQL = Path(__file__).with_name("views.sql")
#: base view names (the images table's raw rows are ``images_all``; ``images`` dedupes them)
BASE_VIEWS = {"pairs": "pairs", "matches": "matches", "candidates": "candidates", "errors": "errors",
              "runs": "runs", "images": "images_all"}


def _duckdb_type(dtype: pa.DataType) -> str:
    if pa.types.is_string(dtype):
        return "VARCHAR"
    if pa.types.is_boolean(dtype):
        return "BOOLEAN"
    if pa.types.is_float64(dtype):
        return "DOUBLE"
    if pa.types.is_float32(dtype):
        return "FLOAT"
    if pa.types.is_int32(dtype):
        return "INTEGER"
    if pa.types.is_int64(dtype):
        return "BIGINT"
    if pa.types.is_timestamp(dtype):
        return "TIMESTAMPTZ" if dtype.tz else "TIMESTAMP"
    if pa.types.is_list(dtype):
        return _duckdb_type(dtype.value_type) + "[]"
    raise TypeError(f"no DuckDB type for {dtype}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _base_view(view: str, table: str, target: StorageTarget) -> str:
    if target.list_files(f"tables/{table}", suffixes=[".parquet"]):
        glob = target.join("tables", table) + "/**/*.parquet"
        return (f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({_quote(glob)}, "
                f"hive_partitioning = true, union_by_name = true)")
    columns = [f"CAST(NULL AS {_duckdb_type(f.type)}) AS {f.name}" for f in TABLE_SCHEMAS[table]]
    columns += ["CAST(NULL AS VARCHAR) AS model", "CAST(NULL AS DATE) AS date"]
    return f"CREATE OR REPLACE VIEW {view} AS SELECT {', '.join(columns)} WHERE false"


def views_sql(out: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The whole SQL script for ``out``: base views, then ``views.sql``."""
    target = StorageTarget.from_url(out, storage_options)
    base = [_base_view(view, table, target) + ";" for table, view in BASE_VIEWS.items()]
    return "\n".join(base) + "\n" + VIEWS_SQL.read_text()


def create_views(connection: Any, out: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Define the views on a DuckDB ``connection``; returns it."""
    connection.execute(views_sql(out, storage_options))
    return connection
