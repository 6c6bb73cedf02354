"""infra.cache: Zarr v3 activation cache."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import uuid

import numpy as np
import pytest

import infra.storage as storage
from infra.cache import ActivationCache, CacheMissError
from pairx_core.errors import ConfigError, PairXError, ShapeError


@pytest.fixture(params=["local", "memory"])
def cache_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "cache")
        return
    url = f"memory://cache-{uuid.uuid4().hex}"
    yield url
    storage.StorageTarget.from_url(url).delete("", recursive=True)


def _batch(n: int, d: int = 8, c: int = 3, hw: int = 4, seed: int = 0, prefix: str = "h"):
    rng = np.random.default_rng(seed)
    hashes = [f"{prefix}{seed}_{i}" for i in range(n)]
    emb = rng.normal(size=(n, d)).astype(np.float32)
    feats = rng.normal(size=(n, c, hw, hw)).astype(np.float32) * 10
    return hashes, emb, feats


def test_put_lookup_get_round_trip(cache_url):
    cache = ActivationCache(cache_url, "model-a", "prep1")
    hashes, emb, feats = _batch(5)
    batch_id = cache.put(hashes, emb, {"blocks.3": feats, "head/conv": feats * 2})
    found = cache.lookup([hashes[3], "unknown", hashes[0]])
    assert set(found) == {hashes[3], hashes[0]}
    assert found[hashes[3]].batch_id == batch_id and found[hashes[3]].row == 3
    order = [hashes[4], hashes[1], hashes[4]]
    got = cache.get_embeddings(order)
    assert got.dtype == np.float32 and got.shape == (3, 8)
    np.testing.assert_array_equal(got, emb[[4, 1, 4]])  # float32 storage: exact
    fmap = cache.get_features(order, "blocks.3")
    assert fmap.dtype == np.float32 and fmap.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(fmap, feats[[4, 1, 4]], rtol=1e-3, atol=1e-3)  # float16 storage
    assert not np.array_equal(fmap, feats[[4, 1, 4]])  # really stored as float16
    np.testing.assert_allclose(cache.get_features([hashes[2]], "head/conv"), feats[[2]] * 2, rtol=1e-3, atol=1e-2)
    assert hashes[0] in cache and "unknown" not in cache


def test_entries_survive_a_new_instance_and_pickling(cache_url):
    writer = ActivationCache(cache_url, "m", "p")
    hashes, emb, _ = _batch(3)
    writer.put(hashes, emb)
    reader = pickle.loads(pickle.dumps(ActivationCache(cache_url, "m", "p")))
    np.testing.assert_array_equal(reader.get_embeddings(hashes), emb)
    # a batch written by another instance after the reader's first call is seen on the next call
    more, emb2, _ = _batch(2, seed=1)
    writer.put(more, emb2)
    np.testing.assert_array_equal(reader.get_embeddings(more), emb2)


def test_model_and_preprocessing_fingerprints_are_separate(cache_url):
    hashes, emb, feats = _batch(2)
    v1 = ActivationCache(cache_url, "model-v1", "prep")
    v2 = ActivationCache(cache_url, "model-v2", "prep")
    other_prep = ActivationCache(cache_url, "model-v1", "prep-448")
    v1.put(hashes, emb, {"l": feats})
    assert v2.lookup(hashes) == {} and other_prep.lookup(hashes) == {}
    with pytest.raises(CacheMissError):
        v2.get_embeddings(hashes)
    v2.put(hashes, emb + 1.0, {"l": feats + 1.0})
    np.testing.assert_array_equal(v1.get_embeddings(hashes), emb)
    np.testing.assert_array_equal(v2.get_embeddings(hashes), emb + 1.0)
    assert sorted(v1.model_fingerprints()) == ["model-v1", "model-v2"]


def test_missing_hashes_and_layers_raise_cache_miss(cache_url):
    cache = ActivationCache(cache_url, "m", "p")
    hashes, emb, feats = _batch(2)
    cache.put(hashes[:1], emb[:1], {"l1": feats[:1]})
    cache.put(hashes[1:], emb[1:])  # no feature maps in this batch
    with pytest.raises(CacheMissError) as info:
        cache.get_embeddings([hashes[0], "nope"])
    assert isinstance(info.value, PairXError) and isinstance(info.value, KeyError)
    assert info.value.missing == ["nope"]
    assert set(cache.lookup(hashes, layer="l1")) == {hashes[0]}
    with pytest.raises(CacheMissError):
        cache.get_features(hashes, "l1")
    with pytest.raises(CacheMissError):
        cache.get_features(hashes[:1], "other-layer")


def test_newest_batch_wins_for_duplicate_hashes(cache_url):
    cache = ActivationCache(cache_url, "m", "p")
    hashes, emb, _ = _batch(3)
    cache.put(hashes, emb)
    cache.put(hashes[1:2], emb[1:2] * 0 + 7.0)
    np.testing.assert_array_equal(cache.get_embeddings([hashes[1]]), np.full((1, 8), 7.0, np.float32))
    listed, matrix = cache.embedding_matrix()
    assert sorted(listed) == sorted(hashes) and matrix.shape == (3, 8)
    np.testing.assert_array_equal(matrix[listed.index(hashes[1])], np.full(8, 7.0))
    np.testing.assert_array_equal(matrix[listed.index(hashes[0])], emb[0])


def test_prune_removes_one_model_only(cache_url):
    keep = ActivationCache(cache_url, "keep", "p")
    drop = ActivationCache(cache_url, "drop", "p")
    hashes, emb, feats = _batch(4)
    keep.put(hashes, emb, {"l": feats})
    drop.put(hashes, emb, {"l": feats})
    total = keep.size_bytes()
    dropped_size = keep.size_bytes("drop")
    assert 0 < dropped_size < total
    freed = keep.prune("drop")
    assert freed == dropped_size
    assert drop.lookup(hashes) == {}
    assert keep.model_fingerprints() == ["keep"]
    np.testing.assert_array_equal(keep.get_embeddings(hashes), emb)
    assert keep.size_bytes() == total - dropped_size
    assert keep.prune("never-existed") == 0


def test_crashed_writer_is_invisible_and_collected(cache_url, monkeypatch):
    cache = ActivationCache(cache_url, "m", "p")
    hashes, emb, feats = _batch(3)

    def crash(staged):
        raise RuntimeError("writer died before committing the index")

    monkeypatch.setattr(storage, "_commit", crash)
    with pytest.raises(RuntimeError):
        cache.put(hashes, emb, {"l": feats})
    monkeypatch.undo()
    # the arrays were written ...
    batch_dirs = cache.target.list_dir(cache.zarr_prefix)
    assert len([b for b in batch_dirs if b != "zarr.json"]) == 1
    assert any(u.endswith("/embeddings/zarr.json") for u in cache.target.list_files(cache.zarr_prefix))
    # ... but no lookup ever sees them
    fresh = ActivationCache(cache_url, "m", "p")
    assert fresh.lookup(hashes) == {} and fresh.embedding_matrix()[0] == []
    with pytest.raises(CacheMissError):
        fresh.get_embeddings(hashes)
    # garbage collection respects the age limit, then removes the orphan
    assert fresh.collect_garbage(min_age_s=3600) == []
    committed = fresh.put(hashes[:1], emb[:1])
    removed = fresh.collect_garbage(min_age_s=0)
    assert len(removed) == 1 and committed not in removed
    np.testing.assert_array_equal(fresh.get_embeddings(hashes[:1]), emb[:1])


def test_layout_is_readable_with_plain_zarr(tmp_path):
    import zarr

    root = tmp_path / "cache"
    cache = ActivationCache(str(root), "m1", "p1")
    hashes, emb, feats = _batch(3)
    batch_id = cache.put(hashes, emb, {"blocks/3": feats})
    base = root / "model=m1" / "prep=p1"
    index = json.loads((base / "index" / f"{batch_id}.json").read_text())
    assert index["hashes"] == hashes and index["batch_id"] == batch_id
    group = zarr.open_group(str(base / "activations.zarr"), mode="r")
    members = {name for name, _ in group.members(max_depth=None)}
    assert f"{batch_id}/embeddings" in members
    emb_read = zarr.open_array(str(base / "activations.zarr" / index["embeddings"]["path"]), mode="r")[:]
    np.testing.assert_array_equal(emb_read, emb)
    fpath = index["layers"]["blocks/3"]["path"]
    fmap = zarr.open_array(str(base / "activations.zarr" / fpath), mode="r")
    assert fmap.dtype == np.float16 and fmap.shape == (3, 3, 4, 4) and fmap.chunks == (1, 3, 4, 4)
    assert fmap.attrs["layer"] == "blocks/3"
    assert group[batch_id].attrs["hashes"] == hashes


def test_put_validates_inputs(tmp_path):
    cache = ActivationCache(str(tmp_path), "m", "p")
    hashes, emb, feats = _batch(3)
    with pytest.raises(ShapeError):
        cache.put(hashes, emb[:2])
    with pytest.raises(ShapeError):
        cache.put(hashes, emb, {"l": feats[:, 0]})
    with pytest.raises(ConfigError):
        cache.put([hashes[0], hashes[0], hashes[1]], emb)
    with pytest.raises(ConfigError):
        cache.put(hashes, emb, {"l": feats * 1e6})  # overflows float16
    with pytest.raises(ConfigError):
        ActivationCache(str(tmp_path), "../escape", "p")
    with pytest.raises(ConfigError):
        ActivationCache(str(tmp_path), "m", "p", feature_dtype="int8")
    assert cache.lookup(hashes) == {}  # nothing half-written became visible
    wide = ActivationCache(str(tmp_path), "m32", "p", feature_dtype="float32")
    wide.put(hashes, emb, {"l": feats * 1e6})
    np.testing.assert_array_equal(wide.get_features(hashes, "l"), feats * 1e6)


def test_embedding_matrix_reads_each_batch_array_once(tmp_path):
    url = str(tmp_path / "gallery")
    writer = ActivationCache(url, "m", "p")
    rng = np.random.default_rng(0)
    expected = {}
    for b in range(20):
        hashes = [f"g{b:02d}_{i:03d}" for i in range(500)]
        emb = rng.normal(size=(500, 64)).astype(np.float32)
        writer.put(hashes, emb)
        expected[hashes[b]] = emb[b]
    reader = ActivationCache(url, "m", "p")  # cold instance: must list and read everything
    reads = []
    real_read_rows = reader._read_rows
    reader._read_rows = lambda store, paths_rows, whole: reads.append(len(paths_rows)) or real_read_rows(
        store, paths_rows, whole)
    hashes, matrix = reader.embedding_matrix()
    assert matrix.shape == (10_000, 64) and matrix.dtype == np.float32
    assert len(set(hashes)) == 10_000
    for h, row in expected.items():
        np.testing.assert_array_equal(matrix[hashes.index(h)], row)
    assert reads == [20]  # one concurrent read of the 20 batch arrays, each whole (the README's figure: bench/)


def _child_reads(cache, hashes, queue):
    try:
        queue.put(cache.get_embeddings(hashes).tolist())
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


def test_cache_used_in_parent_works_in_forked_child(tmp_path):
    cache = ActivationCache(str(tmp_path), "m", "p")
    hashes, emb, _ = _batch(2)
    cache.put(hashes, emb)
    cache.get_embeddings(hashes)  # parent has used zarr (event loop, stores) before forking
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(cache, hashes, queue))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        pytest.fail("forked child hung reading the cache")
    np.testing.assert_array_equal(np.array(queue.get(timeout=5), np.float32), emb)


def test_put_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    cache = ActivationCache(str(tmp_path), "m", "p")
    hashes, emb, feats = _batch(2)
    cache.put(hashes, torch.from_numpy(emb).requires_grad_(True), {"l": torch.from_numpy(feats)})
    np.testing.assert_array_equal(cache.get_embeddings(hashes), emb)
    np.testing.assert_allclose(cache.get_features(hashes, "l"), feats, rtol=1e-3, atol=1e-2)


def _chunk_files(root, prefix: str) -> list:
    """Chunk files (not metadata) of the arrays under ``prefix`` of a local cache."""
    from pathlib import Path

    return sorted(p for p in Path(root).rglob("*") if p.is_file() and prefix in str(p) and "/c/" in str(p))


def test_damaged_rows_are_detected_never_returned(tmp_path):
    """A deleted chunk reads as zeros and overwritten bytes decode to garbage: both are caught."""
    from infra.cache import CacheIntegrityError

    cache = ActivationCache(str(tmp_path), "m", "p")
    hashes, emb, maps = _batch(4)
    feats = {"blocks.3": maps}
    cache.put(hashes, emb, feats)
    assert cache.damaged(hashes) == []
    # embeddings: one chunk for the whole array; features: one chunk per row
    (emb_chunk,) = _chunk_files(tmp_path, "/embeddings/")
    feature_chunks = _chunk_files(tmp_path, "/features/")
    assert len(feature_chunks) == 4
    feature_chunks[2].unlink()  # row 2's feature map: its chunk is gone (zarr would give zeros)
    with pytest.raises(CacheIntegrityError) as raised:
        cache.get_features(hashes, "blocks.3")
    assert raised.value.hashes == [hashes[2]]
    np.testing.assert_allclose(cache.get_features([hashes[0], hashes[3]], "blocks.3"),
                               feats["blocks.3"][[0, 3]], rtol=1e-3)  # undamaged rows still serve

    emb_chunk.unlink()  # every embedding is gone
    assert cache.damaged(hashes) == hashes
    with pytest.raises(CacheIntegrityError):
        cache.get_embeddings(hashes[:1])
    found, matrix = cache.embedding_matrix()
    assert found == [] and cache.last_damaged == sorted(hashes)

    cache.put(hashes, emb, feats)  # recomputed: the newer batch wins
    assert cache.damaged(hashes) == []
    np.testing.assert_allclose(cache.get_embeddings(hashes), emb, rtol=1e-6)


def test_overwritten_bytes_are_detected(tmp_path):
    cache = ActivationCache(str(tmp_path), "m", "p", embedding_dtype="float32")
    hashes, emb, maps = _batch(3)
    cache.put(hashes, emb, {"blocks.3": maps})
    (emb_chunk,) = _chunk_files(tmp_path, "/embeddings/")
    raw = bytearray(emb_chunk.read_bytes())
    raw[-16:] = b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff"  # 16 bytes near the end
    emb_chunk.write_bytes(bytes(raw))
    bad = cache.damaged(hashes)
    assert bad and set(bad) <= set(hashes)
    found, matrix = cache.embedding_matrix()
    assert set(found) == set(hashes) - set(bad) and np.isfinite(matrix).all()


def test_nan_and_zero_embeddings_are_refused(tmp_path):
    cache = ActivationCache(str(tmp_path), "m", "p")
    hashes, emb, maps = _batch(2)
    feats = {"blocks.3": maps}
    emb[1] = 0.0
    with pytest.raises(ConfigError, match="NaN/Inf or all zero"):
        cache.put(hashes, emb, feats)
    emb[1] = np.nan
    with pytest.raises(ConfigError):
        cache.put(hashes, emb, feats)
    assert cache.batches() == []


def test_layer_dtypes_store_explained_layers_exactly(tmp_path):
    cache = ActivationCache(str(tmp_path / "c"), "model-a", "prep1", layer_dtypes={"blocks.3": "float32"})
    hashes, emb, feats = _batch(3)
    feats = feats + 1e-4  # values float16 cannot hold
    cache.put(hashes, emb, {"blocks.3": feats, "other": feats})
    assert np.array_equal(cache.get_features(hashes, "blocks.3"), feats)
    assert not np.array_equal(cache.get_features(hashes, "other"), feats)  # float16 by default
    assert cache.stored_layer_dtypes(hashes, "blocks.3") == {h: "float32" for h in hashes}
    assert cache.stored_layer_dtypes(hashes, "other") == {h: "float16" for h in hashes}
    with pytest.raises(ConfigError):
        ActivationCache(str(tmp_path / "c"), "model-a", "prep1", layer_dtypes={"x": "int8"})


def test_prune_older_than_and_cache_info(tmp_path, monkeypatch):
    import infra.cache as cache_module
    from infra.cache_admin import cache_info, prune_model, prune_older_than

    url = str(tmp_path / "c")
    old_id = "20200101T000000000000Z-0123456789abcdef"
    monkeypatch.setattr(cache_module, "_new_batch_id", lambda: old_id)
    cache = ActivationCache(url, "model-a", "prep1")
    old, emb, feats = _batch(2, seed=1)
    cache.put(old, emb, {"blocks.3": feats})
    monkeypatch.undo()
    new, emb, feats = _batch(3, seed=2)
    cache.put(new, emb, {"blocks.3": feats})
    ActivationCache(url, "model-b", "prep1").put(*_batch(1, seed=3)[:2])
    infos = {i.model: i for i in cache_info(url)}
    assert set(infos) == {"model-a", "model-b"}
    assert infos["model-a"].images == 5 and infos["model-a"].batches == 2 and infos["model-a"].bytes > 0
    assert infos["model-a"].layers == ["blocks.3"]
    removed, freed = prune_older_than(url, days=30)
    assert removed == 1 and freed > 0
    fresh = ActivationCache(url, "model-a", "prep1")
    assert set(fresh.lookup(old + new)) == set(new)  # the old batch is gone, the new one kept
    assert fresh.get_features(new, "blocks.3").shape == (3, 3, 4, 4)
    assert prune_model(url, "model-b") > 0
    assert [i.model for i in cache_info(url)] == ["model-a"]
