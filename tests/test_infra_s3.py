"""The data plane on S3 (a moto server started by the ``s3_server`` fixture)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import infra.storage as storage
from infra.cache import ActivationCache
from infra.images import load_image
from infra.keys import existing_output_keys
from infra.storage import StorageTarget, counting_retries, is_transient
from infra.tables import TABLE_SCHEMAS, read_table, write_table
from pairx_core.errors import ImageError, StorageError

pytestmark = pytest.mark.integration


def _keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    listing = client.list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _pairs_rows(n: int, model_id: str) -> list[dict]:
    rows = []
    for i in range(n):
        row = {}
        for field in TABLE_SCHEMAS["pairs"]:
            if field.name in ("model_id", "run_id", "created_at"):
                continue
            if field.type == "string":
                row[field.name] = f"{field.name}-{i}"
            elif str(field.type).startswith("list"):
                row[field.name] = [i, i, 10, 10]
            else:
                row[field.name] = i
        rows.append(row)
    return rows


def test_storage_round_trip_and_listing(s3_server, s3_bucket):
    target = StorageTarget.from_url(f"s3://{s3_bucket}/root")
    assert target.is_object_store
    target.write_bytes_atomic("a/one.jpg", b"1")
    target.write_bytes_atomic("a/b/two.PNG", b"22")
    assert target.read_bytes("a/b/two.PNG") == b"22"
    assert target.list_files("a", suffixes=[".png", ".jpg"]) == [
        f"s3://{s3_bucket}/root/a/b/two.PNG",
        f"s3://{s3_bucket}/root/a/one.jpg",
    ]
    assert target.exists("a/one.jpg") and not target.exists("a/zero.jpg")
    with pytest.raises(StorageError) as info:
        target.read_bytes("a/zero.jpg")
    assert info.value.uri == f"s3://{s3_bucket}/root/a/zero.jpg"
    # another client writes behind s3fs's back: listings must not be stale
    import boto3

    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="root/a/three.jpg", Body=b"3")
    assert len(target.list_files("a")) == 3 and target.exists("a/three.jpg")


def test_atomic_write_with_failure_before_commit(s3_server, s3_bucket, monkeypatch):
    target = StorageTarget.from_url(f"s3://{s3_bucket}/out")
    target.write_bytes_atomic("state.json", b'{"v": 1}')

    def crash(staged):
        raise RuntimeError("process died between staging and commit")

    monkeypatch.setattr(storage, "_commit", crash)
    with pytest.raises(RuntimeError):
        target.write_bytes_atomic("state.json", b'{"v": 2, "partial": tru')
    with pytest.raises(RuntimeError):
        target.write_bytes_atomic("new.json", b"never")
    monkeypatch.undo()
    assert target.read_bytes("state.json") == b'{"v": 1}'
    assert not target.exists("new.json")
    assert _keys(s3_server, s3_bucket) == ["out/state.json"]  # no temporary objects either
    target.write_bytes_atomic("state.json", b'{"v": 2}')
    assert target.read_bytes("state.json") == b'{"v": 2}'


def test_unreachable_endpoint_is_transient(s3_server, s3_bucket, monkeypatch):
    dead = StorageTarget.from_url(
        f"s3://{s3_bucket}/x",
        {
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
        },
    )
    monkeypatch.setattr(dead.filesystem(), "retries", 1)  # s3fs's own retry loop (cached instance)
    monkeypatch.setenv("PAIRX_IO_ATTEMPTS", "2")  # one retry, not the default minute of backoff
    with counting_retries() as retries, pytest.raises(Exception) as info:
        dead.read_bytes("k")
    assert not isinstance(info.value, StorageError)
    assert is_transient(info.value)
    assert retries.count == 1  # retried once as transient, then given up


def test_cache_put_get_prune_on_s3(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/cache"
    rng = np.random.default_rng(0)
    hashes = [f"h{i}" for i in range(6)]
    emb = rng.normal(size=(6, 16)).astype(np.float32)
    feats = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    cache = ActivationCache(url, "model-a", "prep")
    cache.put(hashes[:4], emb[:4], {"blocks.2": feats[:4]})
    cache.put(hashes[4:], emb[4:], {"blocks.2": feats[4:]})
    other = ActivationCache(url, "model-b", "prep")
    other.put(hashes[:2], emb[:2] + 1)
    reader = ActivationCache(url, "model-a", "prep")
    np.testing.assert_array_equal(reader.get_embeddings(hashes[::-1]), emb[::-1])
    np.testing.assert_allclose(reader.get_features([hashes[5], hashes[0]], "blocks.2"), feats[[5, 0]], atol=2e-3)
    listed, matrix = reader.embedding_matrix()
    assert listed == hashes and np.array_equal(matrix, emb)
    assert other.get_embeddings(hashes[:1])[0, 0] == pytest.approx(emb[0, 0] + 1)
    # the layout is plain Zarr on S3
    import zarr

    batch = reader.batches()[0]
    path = f"{url}/{reader.zarr_prefix}/{batch.embeddings_path}"
    direct = zarr.open_array(path, mode="r")[:]
    np.testing.assert_array_equal(direct, emb[:4])
    freed = reader.prune("model-b")
    assert freed > 0 and other.lookup(hashes) == {}
    assert reader.model_fingerprints() == ["model-a"]
    assert not any(k.startswith("cache/model=model-b/") for k in _keys(s3_server, s3_bucket))
    assert len(reader.lookup(hashes)) == 6


def test_tables_on_s3_read_by_pyarrow_pandas_and_duckdb(s3_server, s3_bucket, tmp_path):
    out = f"s3://{s3_bucket}/out"
    write_table(out, "pairs", _pairs_rows(3, "m1"), "m1", "run-1", date="2024-05-06")
    write_table(out, "pairs", _pairs_rows(2, "m2"), "m2", "run-1", date="2024-05-07")
    frame = read_table(out, "pairs")
    assert len(frame) == 5 and set(frame["model_id"]) == {"m1", "m2"}
    assert existing_output_keys(out, "m2") == {"output_key-0", "output_key-1"}
    via_pandas = pd.read_parquet(f"{out}/tables/pairs/model=m1")
    assert len(via_pandas) == 3

    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    installed = con.sql(
        "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'httpfs'"
    ).fetchall()
    if installed and installed[0][0]:
        con.sql("LOAD httpfs")
        host = s3_server.removeprefix("http://")
        con.sql(
            "CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1', "
            f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
        )
        source = f"{out}/tables/pairs/**/*.parquet"
    else:  # offline without httpfs: query a local copy of the same objects
        local = tmp_path / "copy"
        StorageTarget.from_url(out).filesystem().get(f"{s3_bucket}/out/tables", str(local), recursive=True)
        source = f"{local}/**/*.parquet"
    counts = con.sql(
        f"SELECT model, count(*) FROM read_parquet('{source}', hive_partitioning=true) GROUP BY model ORDER BY model"
    ).fetchall()
    assert counts == [("m1", 3), ("m2", 2)]


def test_load_image_from_s3(s3_server, s3_bucket):
    import boto3

    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=s3_bucket, Key="imgs/zebra.png", Body=data)
    client.put_object(Bucket=s3_bucket, Key="imgs/broken.png", Body=data[:100])
    loaded = load_image(f"s3://{s3_bucket}/imgs/zebra.png", box=(5, 5, 10, 10))
    assert loaded.content_hash == hashlib.sha256(data).hexdigest()
    np.testing.assert_array_equal(np.asarray(loaded.image), array[5:15, 5:15])
    target = StorageTarget.from_url(f"s3://{s3_bucket}/imgs")
    assert load_image("zebra.png", storage=target).uri == f"s3://{s3_bucket}/imgs/zebra.png"
    with pytest.raises(ImageError) as bad:
        load_image("broken.png", storage=target)
    assert bad.value.uri == f"s3://{s3_bucket}/imgs/broken.png"
    with pytest.raises(StorageError):
        load_image(f"s3://{s3_bucket}/imgs/missing.png")
