"""``infra/views.sql`` run verbatim, as a DuckDB CLI user would, with only the output root set."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from infra.tables import write_table
from infra.views import OUT_VARIABLE, VIEWS_SQL, create_views
from test_report import _complete, write_output

VIEWS = ["pairs", "matches", "candidates", "errors", "runs", "decisions", "images_all", "images", "pair_matches",
         "candidate_review", "nights"]


def standalone(out: str) -> duckdb.DuckDBPyConnection:
    """What the README tells a DuckDB user to do: set the variable, run the file."""
    con = duckdb.connect()
    con.execute(f"SET VARIABLE {OUT_VARIABLE} = '{out}'")
    con.execute(Path(VIEWS_SQL).read_text())
    return con


def test_views_sql_runs_on_its_own_like_create_views(tmp_path):
    out = write_output(tmp_path)  # pairs, candidates, errors; no matches, images or runs table yet
    write_table(out, "runs", [_complete("runs", {"flow": "nightly", "n_done": 9})], "m-0123456789abcdef", "run-1",
                date="2024-05-06")
    alone, python = standalone(out), create_views(duckdb.connect(), out)
    for view in VIEWS:
        assert alone.sql(f"SELECT count(*) FROM {view}").fetchall()[0] == python.sql(
            f"SELECT count(*) FROM {view}").fetchall()[0], view
    query = "SELECT date, model_id, uploads, pairs, candidates, failures FROM nights ORDER BY date"
    assert alone.sql(query).fetchall() == python.sql(query).fetchall()
    assert [row[2:] for row in alone.sql(query).fetchall()] == [(3, 9, 9, 1), (0, 2, 0, 0)]
    review = "SELECT query, rank, individual, n_matches FROM candidate_review ORDER BY query, rank"
    assert alone.sql(review).fetchall() == python.sql(review).fetchall()
    assert alone.sql("SELECT count(*) FROM runs WHERE n_done = 9").fetchall()[0] == (1,)
    # the schema's columns exist even where a table has no file yet (typed, so joins bind)
    columns = {row[0]: row[1] for row in alone.sql("DESCRIBE images_all").fetchall()}
    assert columns["content_hash"] == "VARCHAR" and columns["date"] == "DATE" and "empty" not in columns


def test_views_sql_on_an_output_without_tables(tmp_path):
    con = standalone(str(tmp_path / "fresh"))
    for view in VIEWS:
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall()[0] == (0,), view


def test_views_sql_needs_the_variable():
    with pytest.raises(duckdb.Error, match=OUT_VARIABLE):
        duckdb.connect().execute(Path(VIEWS_SQL).read_text())


def test_views_sql_base_views_are_generated_from_the_table_schemas():
    """A column added to a table schema is a column of its standalone view: the file's generated
    section equals what the schemas give (``python -c 'from infra.views import write_views_sql;
    write_views_sql()'`` rewrites it)."""
    from infra.views import BASE_MARKER, DERIVED_MARKER, standalone_base_views_sql

    section = Path(VIEWS_SQL).read_text().split(BASE_MARKER, 1)[1].split(DERIVED_MARKER, 1)[0]
    assert standalone_base_views_sql() in section, "regenerate infra/views.sql: infra.views.write_views_sql()"


def test_views_read_files_written_before_a_column_existed(tmp_path):
    """An output written by an older version (candidates without `top_k`, `explained`, metrics):
    both ways of defining the views still bind every derived view, the new columns read as null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = tmp_path / "out" / "tables" / "candidates" / "model=m1" / "date=2026-01-02"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"query": ["q", "q"], "rank": pa.array([0, 1], pa.int32()),
                             "gallery_image": ["g1", "g2"], "similarity": [0.9, 0.8], "model_id": ["m1", "m1"],
                             "run_id": ["r", "r"], "output_key": ["k1", "k2"]}), part / "old.parquet")
    out = str(tmp_path / "out")
    query = "SELECT query, rank, explained, in_top_k, n_matches FROM candidate_review ORDER BY rank"
    for con in (create_views(duckdb.connect(), out), standalone(out)):
        assert con.sql(query).fetchall() == [("q", 0, None, None, None), ("q", 1, None, None, None)]
        assert con.sql("SELECT uploads, candidates FROM nights").fetchall() == [(1, 2)]
