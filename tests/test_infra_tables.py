"""infra.tables, infra.keys, infra.viz: Parquet outputs, idempotency keys, PNG outputs."""

from __future__ import annotations

import io
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from PIL import Image

import infra.storage as storage
from infra.keys import existing_output_keys, pair_output_key
from infra.storage import StorageTarget
from infra.tables import TABLE_SCHEMAS, count_run_rows, read_table, schema_markdown, table_url, write_table
from infra.viz import viz_uri, write_png
from pairx_core.errors import ConfigError

README_OUTPUTS = Path(__file__).resolve().parents[1] / "infra" / "README_outputs.md"
OUTPUTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)


def _sample_value(field: pa.Field, i: int):
    t = field.type
    if pa.types.is_string(t):
        return f"{field.name}-{i}"
    if pa.types.is_integer(t):
        return i + 1
    if pa.types.is_floating(t):
        return 0.25 * (i + 1)
    if pa.types.is_timestamp(t):
        return WHEN
    if pa.types.is_boolean(t):
        return i % 2 == 0
    if pa.types.is_list(t) and pa.types.is_string(t.value_type):
        return [f"{field.name}-{i}", "x"]
    if pa.types.is_list(t):
        return [float(i), 2.0, 30.0, 40.5]
    raise AssertionError(f"no sample for {t}")


def _rows(name: str, n: int = 3, model_id: str = "miewid-v3") -> list[dict]:
    rows = []
    for i in range(n):
        row = {f.name: _sample_value(f, i) for f in TABLE_SCHEMAS[name]}
        row["model_id"] = model_id
        rows.append(row)
    return rows


@pytest.fixture(params=["local", "memory"])
def out_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    url = f"memory://out-{uuid.uuid4().hex}"
    yield url
    StorageTarget.from_url(url).delete("", recursive=True)


@pytest.mark.parametrize("name", sorted(TABLE_SCHEMAS))
def test_round_trip_every_table(out_url, name):
    rows = _rows(name)
    url = write_table(out_url, name, rows, "miewid-v3", "run-42", date="2024-05-06")
    expected_dir = f"{table_url(out_url, name)}/model=miewid-v3/date=2024-05-06/"
    assert url.startswith(expected_dir)
    assert re.fullmatch(r"part-run-42-[0-9a-f]{12}\.parquet", url.rsplit("/", 1)[1])
    frame = read_table(out_url, name)
    schema = TABLE_SCHEMAS[name]
    assert list(frame.columns) == schema.names + ["date"]
    assert len(frame) == 3 and (frame["date"] == "2024-05-06").all()
    frame = frame.sort_values(schema.names[0]).reset_index(drop=True)
    for field in schema:
        got = frame[field.name].tolist()
        want = [r[field.name] for r in rows]
        if pa.types.is_timestamp(field.type):
            assert [pd.Timestamp(g).to_pydatetime() for g in got] == want
        elif pa.types.is_floating(field.type):
            np.testing.assert_allclose(got, want)
        elif pa.types.is_list(field.type):
            assert [list(g) for g in got] == want, field.name
        else:
            assert got == want, field.name


def test_auto_columns_are_filled(tmp_path):
    out = str(tmp_path)
    rows = [{k: v for k, v in r.items() if k not in ("model_id", "run_id", "created_at")} for r in _rows("pairs")]
    before = datetime.now(timezone.utc)
    write_table(out, "pairs", rows, "m1", "run-7")
    frame = read_table(out, "pairs")
    assert set(frame["model_id"]) == {"m1"} and set(frame["run_id"]) == {"run-7"}
    created = frame["created_at"].iloc[0]
    assert created.tzinfo is not None and created >= pd.Timestamp(before).floor("us")
    assert frame["date"].iloc[0] == before.date().isoformat()


def test_partitions_models_and_dates_and_filters(tmp_path):
    out = str(tmp_path)
    odd = "hf-hub:org/miewid v2"  # characters that are not path-safe
    write_table(out, "candidates", _rows("candidates", 2, "m1"), "m1", "r1", date="2024-01-01")
    write_table(out, "candidates", _rows("candidates", 3, odd), odd, "r2", date="2024-01-02")
    write_table(out, "candidates", _rows("candidates", 1, "m1"), "m1", "r3", date="2024-01-02")
    assert len(read_table(out, "candidates")) == 6
    only_odd = read_table(out, "candidates", model_id=odd)
    assert len(only_odd) == 3 and set(only_odd["model_id"]) == {odd}
    day2 = read_table(out, "candidates", [("date", "==", "2024-01-02")])
    assert len(day2) == 4
    ranked = read_table(out, "candidates", [("rank", ">=", 2)], model_id="m1", columns=["query", "rank"])
    assert list(ranked.columns) == ["query", "rank"] and ranked["rank"].tolist() == [2]
    # generic readers: pyarrow.dataset with hive partitioning and pandas read the same folder
    folder = table_url(out, "candidates")
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 6 and {"model", "date", "model_id"} <= set(table.column_names)
    assert set(table["model"].to_pylist()) == {"m1", odd}  # URL-decoded partition value
    assert len(pd.read_parquet(folder)) == 6


def test_count_run_rows_counts_one_run_of_one_model(out_url):
    write_table(out_url, "pairs", _rows("pairs", 2, "m1"), "m1", "run-a", date="2024-01-01")
    write_table(out_url, "pairs", _rows("pairs", 3, "m1"), "m1", "run-a", date="2024-01-02")  # across midnight
    write_table(out_url, "pairs", _rows("pairs", 4, "m1"), "m1", "run-b")
    write_table(out_url, "pairs", _rows("pairs", 6, "m1"), "m1", "run-a-2")  # same prefix, another run
    write_table(out_url, "pairs", _rows("pairs", 5, "m2"), "m2", "run-a")
    assert count_run_rows(out_url, "pairs", "m1", "run-a") == 5
    assert count_run_rows(out_url, "pairs", "m1", "run-c") == 0
    with pytest.raises(ConfigError, match="unknown table"):
        count_run_rows(out_url, "nope", "m1", "run-a")


def test_duckdb_reads_the_dataset(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = str(tmp_path / "out")
    write_table(out, "pairs", _rows("pairs", 3), "miewid-v3", "r1", date="2024-05-06")
    write_table(out, "pairs", _rows("pairs", 2, "other"), "other", "r2", date="2024-05-07")
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    counts = con.sql(
        f"SELECT model, count(*) AS n, max(similarity) AS best "
        f"FROM read_parquet('{out}/tables/pairs/**/*.parquet', hive_partitioning=true) "
        f"GROUP BY model ORDER BY model"
    ).fetchall()
    assert counts == [("miewid-v3", 3, 0.75), ("other", 2, 0.5)]
    # the example query documented in docs/outputs.md runs as written
    text = OUTPUTS_DOC.read_text()
    match = re.search(r"```sql\n(.*?)```", text, re.S)
    assert match, "docs/outputs.md must contain a ```sql example"
    rows = con.sql(match.group(1).replace("OUT/", f"{out}/")).fetchall()
    assert len(rows) >= 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "similarity"} for r in rows],
         "missing columns ['similarity']"),
        (lambda rows: [dict(r, simlarity=0.1) for r in rows], "unknown columns ['simlarity']"),
        (lambda rows: [dict(r, pair_id=None) for r in rows], "'pair_id' has 3 null"),
        (lambda rows: [dict(r, n_matches="many") for r in rows], "do not fit the schema"),
        (lambda rows: [dict(r, model_id="someone-else") for r in rows], "model_id"),
        (lambda rows: ["not a dict"], "rows must be dicts"),
    ],
)
def test_schema_validation_errors(tmp_path, mutate, message):
    with pytest.raises(ConfigError) as info:
        write_table(str(tmp_path), "pairs", mutate(_rows("pairs")), "miewid-v3", "r")
    assert message in str(info.value)
    assert not (tmp_path / "tables").exists()  # nothing written


def test_other_validation_errors(tmp_path):
    with pytest.raises(ConfigError):
        write_table(str(tmp_path), "nope", [{}], "m", "r")
    with pytest.raises(ConfigError):
        write_table(str(tmp_path), "errors", _rows("errors"), "", "r")
    with pytest.raises(ConfigError):
        write_table(str(tmp_path), "errors", _rows("errors"), "miewid-v3", "r", date="yesterday")
    with pytest.raises(ConfigError):
        read_table(str(tmp_path), "pairs", columns=["no_such_column"])


def test_table_and_dataframe_inputs_and_empty_calls(tmp_path):
    out = str(tmp_path)
    frame = pd.DataFrame(_rows("matches", 4))
    write_table(out, "matches", frame, "miewid-v3", "r1")
    write_table(out, "matches", pa.Table.from_pylist(_rows("matches", 2)), "miewid-v3", "r2")
    got = read_table(out, "matches")
    assert len(got) == 6 and got["x_0"].dtype == np.float32
    assert write_table(out, "matches", [], "miewid-v3", "r3") is None
    assert len(StorageTarget.from_url(out).list_files("tables/matches")) == 2


def test_runs_parameters_dict_is_stored_as_json(tmp_path):
    row = _rows("runs", 1)[0]
    row["parameters"] = {"k_lines": 20, "layers": ["a", "b"]}
    write_table(str(tmp_path), "runs", [row], "miewid-v3", "run-1")
    stored = read_table(str(tmp_path), "runs")["parameters"].iloc[0]
    assert stored == '{"k_lines": 20, "layers": ["a", "b"]}'


def test_read_before_any_write_gives_typed_empty_frame(tmp_path):
    frame = read_table(str(tmp_path / "nothing"), "pairs")
    assert frame.empty and list(frame.columns) == TABLE_SCHEMAS["pairs"].names + ["date"]


def test_crashed_table_write_leaves_no_readable_file(tmp_path, monkeypatch):
    out = str(tmp_path)
    write_table(out, "errors", _rows("errors", 1), "miewid-v3", "r1")

    def crash(staged):
        raise RuntimeError("died")

    monkeypatch.setattr(storage, "_commit", crash)
    monkeypatch.setattr(storage._Staged, "discard", lambda self: None)
    with pytest.raises(RuntimeError):
        write_table(out, "errors", _rows("errors", 5), "miewid-v3", "r2")
    monkeypatch.undo()
    assert len(read_table(out, "errors")) == 1  # the temp file is skipped by the reader
    assert len(list((tmp_path / "tables" / "errors").rglob("*.parquet"))) == 1


def test_schema_markdown_documents_every_column_and_readme_is_current():
    text = schema_markdown()
    for name, schema in TABLE_SCHEMAS.items():
        assert f"### `{name}`" in text
        for field in schema:
            assert f"| `{field.name}` |" in text
    assert text in README_OUTPUTS.read_text(), "regenerate infra/README_outputs.md from schema_markdown()"


# ---------------------------------------------------------------------- keys
def test_pair_output_key_is_stable_and_sensitive_to_every_input():
    base = dict(hash_0="a" * 64, hash_1="b" * 64, model_fingerprint="fp1", layer="blocks.3",
                k_lines=20, k_colors=5, engine_version="0.1.0")
    key = pair_output_key(**base)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    # pinned: the recipe must not change silently (that would re-run every explanation)
    assert key == "055f3a00a1f1cd73a7dfcbdc9ab4e8b900dafba6ba30cf93c7baec9a8c39628a"
    assert pair_output_key(**base) == key
    swapped = dict(base, hash_0=base["hash_1"], hash_1=base["hash_0"])
    assert pair_output_key(**swapped) != key
    for field, value in [("model_fingerprint", "fp2"), ("layer", "blocks.4"), ("k_lines", 21),
                         ("k_colors", 6), ("engine_version", "0.1.1")]:
        assert pair_output_key(**dict(base, **{field: value})) != key, field
    assert pair_output_key(**base, extra={}) == key
    with_extra = pair_output_key(**base, extra={"b": 1, "a": [1, 2]})
    assert with_extra != key
    assert pair_output_key(**base, extra={"a": [1, 2], "b": 1}) == with_extra
    with pytest.raises(ConfigError):
        pair_output_key(**base, extra={"x": object()})
    with pytest.raises(ConfigError):
        pair_output_key(**dict(base, hash_0=""))


def test_existing_output_keys_per_model(out_url):
    assert existing_output_keys(out_url, "m1") == set()
    rows_m1 = _rows("pairs", 3, "m1")
    write_table(out_url, "pairs", rows_m1, "m1", "r1")
    write_table(out_url, "pairs", _rows("pairs", 2, "m2")[:1], "m2", "r1")
    more = [dict(r, output_key=f"late-{i}") for i, r in enumerate(_rows("pairs", 2, "m1"))]
    write_table(out_url, "pairs", more, "m1", "r2", date="2030-01-01")
    assert existing_output_keys(out_url, "m1") == {r["output_key"] for r in rows_m1} | {"late-0", "late-1"}
    assert existing_output_keys(out_url, "m2") == {"output_key-0"}


# ---------------------------------------------------------------------- viz
def test_viz_uri_layout_and_sanitising(tmp_path):
    out = str(tmp_path / "out")
    uri = viz_uri(out, "miewid-v3", "pair-001", "blocks.3")
    assert uri == f"{out}/viz/model=miewid-v3/pair-001/blocks.3.png"
    a = viz_uri(out, "hf:org/m", "q/1", "layer/4")
    b = viz_uri(out, "hf:org/m", "q/1", "layer_4")
    assert a != b
    assert a.startswith(f"{out}/viz/model=") and a.count("/") == uri.count("/")
    assert viz_uri("s3://bucket/out", "m", "p", "l") == "s3://bucket/out/viz/model=m/p/l.png"


def test_write_png_round_trip(out_url):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    uri = viz_uri(out_url, "m", "pair", "l")
    target = StorageTarget.from_url(out_url)
    assert write_png(target, uri, image) == uri
    decoded = Image.open(io.BytesIO(target.read_bytes(uri)))
    assert decoded.format == "PNG"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))
    assert write_png(None, uri, image.convert("L")) == uri
    assert Image.open(io.BytesIO(target.read_bytes(uri))).mode == "L"
