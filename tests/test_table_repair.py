"""Damaged table files: read around, reported by `pairx verify`, moved aside by --repair; gc and views cope."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra.tables import TABLE_SCHEMAS, DamagedTableError, read_table, write_table


def _pair_rows(start: int, n: int, commit: str = "c" * 16) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        row = {name: None for name in TABLE_SCHEMAS["pairs"].names if name not in ("model_id", "run_id", "created_at")}
        row.update(pair_id=f"p{i:05d}", image_0=f"q{i}.jpg", image_1=f"g{i}.jpg", layer="blocks.3",
                   similarity=i / 1000.0, output_key=f"k{i}", commit_id=commit)
        rows.append(row)
    return rows


def truncate(path: str) -> None:
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])


def zero_range(path: str) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[64:256] = bytes(192)  # inside the first data pages (the footer is at the end)
    Path(path).write_bytes(bytes(raw))


@pytest.fixture
def damaged_out(tmp_path):
    """Three pairs files of 50 rows: one cut short, one with a zeroed byte range, one intact."""
    out = str(tmp_path / "out")
    files = [write_table(out, "pairs", _pair_rows(50 * i, 50), "m1", f"run{i}") for i in range(3)]
    truncate(files[0])
    zero_range(files[1])
    return out, files


def test_readers_skip_damaged_files_with_a_warning_or_raise(damaged_out, caplog):
    out, files = damaged_out
    with caplog.at_level(logging.WARNING, logger="pairx.tables"):
        frame = read_table(out, "pairs")
    assert sorted(frame.pair_id) == [f"p{i:05d}" for i in range(100, 150)]  # the intact file's rows
    assert "2 damaged file(s)" in caplog.text and os.path.basename(files[0]) in caplog.text
    # the zeroed range lies in the first columns' pages: a reader of other columns still gets them
    assert len(read_table(out, "pairs", columns=["output_key"])) == 100
    with pytest.raises(DamagedTableError, match="1 damaged file"):  # the cut one
        read_table(out, "pairs", columns=["commit_id"], damaged="raise")


def test_verify_reports_then_repair_quarantines_and_duckdb_reads_again(damaged_out):
    import duckdb

    from flows.cli import app
    from infra.views import create_views

    out, files = damaged_out
    runner = CliRunner()
    checked = runner.invoke(app, ["verify", out])
    assert checked.exit_code == 1, checked.output
    assert "tables: 3 file(s), 2 damaged" in checked.output
    assert all(os.path.exists(f) for f in files)  # verify alone changes nothing
    assert not os.path.exists(os.path.join(out, "_pairx", "quarantine"))

    # the views leave out what DuckDB cannot open (the cut file); the zeroed one needs the repair
    connection = create_views(duckdb.connect(), out)
    with pytest.raises(duckdb.Error):
        connection.execute("SELECT * FROM pairs").fetchall()

    repaired = runner.invoke(app, ["verify", out, "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "moved 2 table file(s) to quarantine (2 damaged" in repaired.output
    for path in files[:2]:
        assert not os.path.exists(path)
        relative = os.path.relpath(path, out)
        assert os.path.exists(os.path.join(out, "_pairx", "quarantine", relative))  # same name, same place
    assert runner.invoke(app, ["verify", out]).exit_code == 0
    connection = create_views(duckdb.connect(), out)
    assert len(connection.execute("SELECT * FROM pairs").fetchall()) == 50


def test_views_leave_out_a_file_cut_short(tmp_path):
    import duckdb

    from infra.views import create_views

    out = str(tmp_path)
    files = [write_table(out, "pairs", _pair_rows(10 * i, 10), "m1", f"run{i}") for i in range(2)]
    truncate(files[0])
    connection = create_views(duckdb.connect(), out)
    assert connection.execute("SELECT count(*) FROM pairs").fetchone() == (10,)


@pytest.mark.parametrize("command", ["gc", "compact"])
def test_gc_and_compact_refuse_while_pairs_are_damaged(damaged_out, command):
    from flows.cli import app

    out, files = damaged_out
    result = CliRunner().invoke(app, [command, out])
    assert result.exit_code == 1 and "damaged file" in result.output and "--repair" in result.output
    assert all(os.path.exists(f) for f in files)


def test_verify_finds_damaged_cache_rows_and_missing_pictures(tmp_path):
    import numpy as np

    from flows.cli import app
    from infra.cache import ActivationCache

    out = tmp_path / "out"
    cache = ActivationCache(str(out / "cache"), "model-a", "prep1")
    cache.put(["h1", "h2"], np.ones((2, 4), np.float32),
              {"blocks.3": np.ones((2, 3, 2, 2), np.float32)})
    rows = _pair_rows(0, 2)
    rows[0]["viz_uri"] = str(out / "viz" / "model=m1" / "p00000" / "blocks.3-cccc.png")
    write_table(str(out), "pairs", rows, "m1", "run0")
    runner = CliRunner()
    assert "cache: 4 row(s) checked, 0 damaged" in runner.invoke(app, ["verify", str(out)]).output
    chunk = next(p for p in (out / "cache").rglob("*") if p.is_file() and "/features/" in str(p) and "/c/" in str(p))
    chunk.unlink()
    result = runner.invoke(app, ["verify", str(out), "--json"])
    assert result.exit_code == 1
    import json

    report = json.loads(result.output)
    assert len(report["damaged_cache"]) == 1 and "features" in report["damaged_cache"][0]
    assert report["pictures"] == 1 and len(report["missing_pictures"]) == 1


# ------------------------------------------------------------------------------ a night after the damage
MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def _night_config(photos: Path, out: Path):
    from flows.config import NightlyConfig

    return NightlyConfig(uploads=str(photos / "uploads"), gallery=str(photos / "gallery"), out=str(out), model=MODEL,
                         layers=[LAYER], k_colors=0, k_lines=3, top_k=2, rerank_k=0, batch_pairs=2, workers=0,
                         allow_random_weights=True)


def _pairs_files(out: Path) -> list[str]:
    return sorted(str(p) for p in (out / "tables" / "pairs").rglob("*.parquet"))


def _every_pair_once(out: Path, expected: int) -> None:
    import duckdb

    from infra.views import create_views

    pairs = read_table(str(out), "pairs")
    assert pairs.output_key.nunique() == expected and not pairs.output_key.duplicated().any()
    candidates = read_table(str(out), "candidates")
    assert not candidates.duplicated(["query", "gallery_image"]).any()
    assert candidates.output_key.dropna().isin(set(pairs.output_key)).all()
    connection = create_views(duckdb.connect(), str(out))
    for view in ("pairs", "matches", "candidates", "errors", "runs", "images_all"):
        connection.execute(f"SELECT * FROM {view}").fetchall()  # DuckDB reads every table


@pytest.mark.integration
@pytest.mark.slow
def test_a_night_after_a_cut_or_zeroed_pairs_file_recomputes_the_lost_pairs_once(prefect_harness, tmp_path):
    from night_helpers import write_night

    from flows.nightly import nightly

    photos = write_night(tmp_path / "photos", 3, seed=7)
    out = tmp_path / "out"
    first = nightly(_night_config(photos, out))
    assert first["done"] == 6 and len(_pairs_files(out)) == 3  # 3 uploads x top 2, 2 pairs a batch

    truncate(_pairs_files(out)[0])
    second = nightly(_night_config(photos, out))
    assert second["status"] == "completed" and second["repaired_files"] == 1
    assert second["done"] == 2  # the cut file's pairs, recomputed; the others skipped
    _every_pair_once(out, 6)
    quarantined = list((out / "_pairx" / "quarantine" / "tables" / "pairs").rglob("*.parquet"))
    assert len(quarantined) == 1
    runs = read_table(str(out), "runs").sort_values("started_at")
    assert list(runs.n_repaired_files.fillna(0)) == [0, 1]

    zero_range(_pairs_files(out)[-1])
    third = nightly(_night_config(photos, out))
    assert third["status"] == "completed" and third["repaired_files"] == 1
    _every_pair_once(out, 6)

    # a matches file cut short: its pairs are explained again (their pairs rows are moved aside too)
    import pyarrow.parquet as pq

    committed = set(read_table(str(out), "pairs").commit_id)
    in_use = [str(p) for p in sorted((out / "tables" / "matches").rglob("*.parquet"))
              if set(pq.read_table(p, columns=["commit_id"])["commit_id"].to_pylist()) <= committed]
    truncate(in_use[0])
    fourth = nightly(_night_config(photos, out))
    assert fourth["status"] == "completed" and fourth["repaired_files"] == 1 and fourth["done"] == 2
    _every_pair_once(out, 6)
    pairs, matches = read_table(str(out), "pairs"), read_table(str(out), "matches")
    assert set(pairs[pairs.n_matches > 0].commit_id) <= set(matches.commit_id)


def test_the_quiet_night_check_sees_damage(damaged_out, tmp_path):
    from infra.verify import needs_repair

    out, _ = damaged_out
    assert needs_repair(out)
    clean = str(tmp_path / "clean")
    write_table(clean, "pairs", _pair_rows(0, 3), "m1", "run0")
    assert not needs_repair(clean)


def test_a_file_that_reads_but_clashes_with_the_schema_is_no_damage(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path)
    write_table(out, "pairs", _pair_rows(0, 3), "m1", "run0")
    folder = tmp_path / "tables" / "pairs" / "model=m1" / "date=2024-05-01"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"pair_id": ["x"], "similarity": ["not a number"]}),
                   folder / "part-odd-000000000000.parquet")
    with pytest.raises(Exception, match="similarity|string|double"):
        read_table(out, "pairs")
