"""Activation cache in Zarr v3: embeddings and feature maps keyed by image content hash.

Keyed by (model fingerprint, preprocessing fingerprint, layer, image content hash). A different
model fingerprint is a different subtree, so a changed model never reads stale entries, and
several model versions live side by side.

Layout (``<root>`` is any fsspec URL)::

    <root>/
      model=<model_fp>/                       plain folder
        prep=<prep_fp>/                       plain folder
          activations.zarr/                   Zarr v3 group (the hierarchy root)
            <batch_id>/                       group; attrs: hashes, layers, created_at
              embeddings                      array (N, D), one chunk, dims (row, dim)
              features/                       group
                <layer_key>                   array (N, C, h, w), chunk (1, C, h, w),
                                              dims (row, channel, y, x); attrs: layer
          index/                              plain folder, outside the Zarr hierarchy
            <batch_id>.json                   the commit record, written LAST, atomically

``<batch_id>`` is ``<UTC yyyymmddTHHMMSSffffff>Z-<16 hex>``: unique and sortable by time.
``<layer_key>`` is the layer name when it only contains ``[A-Za-z0-9._-]``, else a sanitised name
plus a short hash (``infra.storage.safe_segment``); the true name is in the array attrs and in the
index. Row ``i`` of every array of a batch belongs to ``index["hashes"][i]``.

Concurrency by construction: each :meth:`ActivationCache.put` writes NEW arrays under a fresh
batch id, so no two writers ever write the same chunk, shard or array; the only shared object is
``activations.zarr/zarr.json`` (the root group document, no attributes), created when missing with
identical content. An entry becomes visible only when its index file exists; a writer that crashes
before that leaves arrays that no lookup ever returns (:meth:`ActivationCache.collect_garbage`
deletes them later). If two batches hold the same hash, the newest batch id wins (both hold the
same values for a deterministic model).

Integrity: the index records a checksum of every stored row (first 16 hex digits of the SHA-256
of the row's bytes as stored), and every read verifies the rows it returns. Zarr answers a missing
chunk with the fill value and decodes damaged bytes without complaint, so without this a deleted
or overwritten chunk would silently become zeros or garbage. A row whose checksum does not match,
or whose values are NaN/Inf, or an all-zero embedding, is *damaged*: readers raise
:class:`CacheIntegrityError` (never return it), :meth:`ActivationCache.damaged` lists such
entries so that the pipeline recomputes them (the new batch is newer and wins), and
:meth:`ActivationCache.embedding_matrix` leaves them out. Batches written before checksums existed
(index format 1) get the NaN/Inf/zero checks only.

Index file (JSON)::

    {"format": 2, "batch_id": ..., "model_fingerprint": ..., "prep_fingerprint": ...,
     "created_at": ISO-8601, "hashes": [N strings],
     "embeddings": {"path": "<batch_id>/embeddings", "shape": [N, D], "dtype": "float32"},
     "layers": {"<layer>": {"path": "<batch_id>/features/<layer_key>",
                            "shape": [N, C, h, w], "dtype": "float16"}},
     "checksums": {"embeddings": [N hex], "layers": {"<layer>": [N hex]}}}

Reading without this module::

    import json, fsspec, zarr
    base = "<root>/model=<fp>/prep=<pfp>"
    fs, path = fsspec.core.url_to_fs(base)
    for name in fs.ls(path + "/index"):
        idx = json.loads(fs.cat_file(name))
        path = f"{base}/activations.zarr/{idx['embeddings']['path']}"
        emb = zarr.open_array(path, mode="r")[:]                 # (N, D), row i = idx["hashes"][i]

Stores are opened inside each call, never at import time or in ``__init__`` (a store opened in a
parent process fails in a forked child). Instances are picklable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
import hashlib
import uuid

import numpy as np

from pairx_core.errors import ConfigError, PairXError, ShapeError

from .storage import StorageTarget, is_transient, safe_segment

__all__ = ["ActivationCache", "BatchIndex", "CacheIntegrityError", "CacheLocation", "CacheMissError"]

_FP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BATCH_RE = re.compile(r"^(\d{8}T\d{12})Z-[0-9a-f]{16}$")
_INDEX_FORMAT = 2
_MAX_READ_THREADS = 16


class CacheMissError(PairXError, KeyError):
    """Some requested hashes are not in the cache (for this model, preprocessing and layer)."""

    def __init__(self, missing: Sequence[str], what: str):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
        super().__init__(f"{len(self.missing)} hash(es) not cached for {what}: {shown}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CacheIntegrityError(PairXError):
    """Cached rows are damaged (checksum mismatch, missing chunk, NaN/Inf, zero embedding)."""

    def __init__(self, hashes: Sequence[str], what: str):
        self.hashes = list(hashes)
        self.what = what
        shown = ", ".join(self.hashes[:5]) + (" ..." if len(self.hashes) > 5 else "")
        super().__init__(f"{len(self.hashes)} damaged cache entr{'y' if len(self.hashes) == 1 else 'ies'} in "
                         f"{what}: {shown}; the pipeline recomputes them")


def row_checksums(values: np.ndarray) -> list[str]:
    """Checksum of each row ``values[i]`` as stored: 16 hex digits of SHA-256 of its bytes."""
    values = np.ascontiguousarray(values)
    return [hashlib.sha256(values[i].tobytes()).hexdigest()[:16] for i in range(values.shape[0])]


def _bad_values(values: np.ndarray, embeddings: bool) -> np.ndarray:
    """Rows with NaN/Inf values, or (embeddings) all zeros: ``(N,)`` bool."""
    flat = values.reshape(values.shape[0], -1).astype(np.float32, copy=False)
    bad = ~np.isfinite(flat).all(axis=1)
    if embeddings:
        bad |= ~np.any(flat != 0, axis=1)
    return bad


def _row_by_row(array: Any, rows: np.ndarray | None) -> np.ndarray:
    """Rows of ``array`` read one at a time; a row whose chunk does not decode becomes NaN (damaged)."""
    wanted = np.arange(array.shape[0]) if rows is None else rows
    dtype = array.dtype if np.dtype(array.dtype).kind == "f" else np.float32  # checksums are of stored bytes
    out = np.full((len(wanted), *array.shape[1:]), np.nan, dtype=dtype)
    for position, row in enumerate(wanted):
        try:
            out[position] = np.asarray(array[int(row)])
        except Exception as error:  # noqa: BLE001
            if is_transient(error):
                raise
    return out


@dataclass(frozen=True)
class CacheLocation:
    """Where one cached image lives: row ``row`` of every array of batch ``batch_id``."""

    batch_id: str
    row: int


@dataclass(frozen=True)
class BatchIndex:
    """The parsed commit record of one batch (see the module docstring)."""

    batch_id: str
    hashes: tuple[str, ...]
    embeddings_path: str
    embedding_shape: tuple[int, int]
    layers: Mapping[str, str]  # layer name -> array path relative to activations.zarr
    created_at: str
    #: array path -> per-row checksums (empty for format-1 batches, written before checksums)
    checksums: Mapping[str, tuple[str, ...]] = None  # type: ignore[assignment]
    #: layer name -> stored dtype of its feature maps
    layer_dtypes: Mapping[str, str] = None  # type: ignore[assignment]

    @classmethod
    def from_json(cls, raw: bytes) -> BatchIndex:
        doc = json.loads(raw)
        layers = {name: spec["path"] for name, spec in doc["layers"].items()}
        sums = doc.get("checksums") or {}
        checksums = {}
        if sums.get("embeddings"):
            checksums[doc["embeddings"]["path"]] = tuple(sums["embeddings"])
        for name, values in (sums.get("layers") or {}).items():
            if name in layers:
                checksums[layers[name]] = tuple(values)
        return cls(
            batch_id=doc["batch_id"],
            hashes=tuple(doc["hashes"]),
            embeddings_path=doc["embeddings"]["path"],
            embedding_shape=tuple(doc["embeddings"]["shape"]),  # type: ignore[arg-type]
            layers=layers,
            created_at=doc["created_at"],
            checksums=checksums,
            layer_dtypes={name: spec.get("dtype", "float16") for name, spec in doc["layers"].items()},
        )


def _check_fingerprint(name: str, value: str) -> str:
    if not isinstance(value, str) or not _FP_RE.match(value):
        raise ConfigError(
            f"{name} must match {_FP_RE.pattern} (it becomes a path segment), got {value!r}"
        )
    return value


def _validated_batch(hashes: Sequence[str], embeddings: Any, features: Mapping[str, Any] | None
                     ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    """``put``'s arguments checked and as numpy: hashes, ``(N, D)`` embeddings, feature maps
    ``(N, C, h, w)`` by layer, and each layer's store key.

    Raises:
        ShapeError: array shapes do not match ``N``.
        ConfigError: duplicate/empty hashes or layer names, or layer names that collide as keys.
    """
    hashes = [str(h) for h in hashes]
    n = len(hashes)
    if n == 0:
        raise ConfigError("put() needs at least one hash")
    if len(set(hashes)) != n or any(not h for h in hashes):
        raise ConfigError("put() hashes must be distinct non-empty strings")
    emb = _as_numpy(embeddings)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ShapeError("embeddings", emb.shape, f"(N={n}, D)")
    feats = {layer: _as_numpy(array) for layer, array in (features or {}).items()}
    for layer, array in feats.items():
        if not isinstance(layer, str) or not layer:
            raise ConfigError(f"layer names must be non-empty strings, got {layer!r}")
        if np.ndim(array) != 4 or np.shape(array)[0] != n:
            raise ShapeError(f"features[{layer!r}]", np.shape(array), f"(N={n}, C, h, w)")
    keys = {layer: safe_segment(layer) for layer in feats}
    if len(set(keys.values())) != len(keys):
        raise ConfigError(f"layer names collide after sanitising: {sorted(feats)}")
    return hashes, emb, feats, keys


def _as_numpy(values: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors (any device, with grad) are detached and moved."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _new_batch_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}Z-{uuid.uuid4().hex[:16]}"


def _batch_time(batch_id: str) -> datetime | None:
    match = _BATCH_RE.match(batch_id)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)


class ActivationCache:
    """Embeddings ``(D,)`` and feature maps ``(C, h, w)`` of one model + preprocessing.

    Args:
        url: cache root (local path, ``memory://``, ``s3://bucket/prefix``, ...).
        model_fingerprint: identifies the model weights/architecture (``[A-Za-z0-9._-]``).
        prep_fingerprint: ``Preprocessing.fingerprint()``.
        storage_options: fsspec options for non-local roots.
        embedding_dtype: stored dtype of embeddings (float32 by default: similarity scores are
            reported to 1e-6; float16 halves the size at ~1e-3 relative error).
        feature_dtype: stored dtype of feature maps (float16 by default).
        layer_dtypes: per-layer override of ``feature_dtype``. The layers that PAIR-X re-ranking
            reads back (stage 1 runs the network above the layer from the cached maps) are
            stored float32 so that stage 1 equals the full path; see ``docs/rerank.md``.

    Getters always return float32.
    """

    def __init__(
        self,
        url: str,
        model_fingerprint: str,
        prep_fingerprint: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        embedding_dtype: str = "float32",
        feature_dtype: str = "float16",
        layer_dtypes: Mapping[str, str] | None = None,
    ) -> None:
        self.target = StorageTarget.from_url(url, storage_options)
        self.model_fingerprint = _check_fingerprint("model_fingerprint", model_fingerprint)
        self.prep_fingerprint = _check_fingerprint("prep_fingerprint", prep_fingerprint)
        for name, dtype in (("embedding_dtype", embedding_dtype), ("feature_dtype", feature_dtype)):
            if np.dtype(dtype).kind != "f":
                raise ConfigError(f"{name} must be a float dtype, got {dtype!r}")
        self.embedding_dtype = np.dtype(embedding_dtype).name
        self.feature_dtype = np.dtype(feature_dtype).name
        self.layer_dtypes = {}
        for layer, dtype in (layer_dtypes or {}).items():
            if np.dtype(dtype).kind != "f":
                raise ConfigError(f"layer_dtypes[{layer!r}] must be a float dtype, got {dtype!r}")
            self.layer_dtypes[layer] = np.dtype(dtype).name
        self._known: dict[str, BatchIndex] = {}
        self.last_damaged: list[str] = []
        self._maps: dict[tuple[tuple[str, ...], str | None], dict[str, CacheLocation]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_known"] = {}
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"ActivationCache({self.target.root!r}, model={self.model_fingerprint!r}, "
            f"prep={self.prep_fingerprint!r})"
        )

    # ------------------------------------------------------------------ paths
    @property
    def prefix(self) -> str:
        """``model=<fp>/prep=<pfp>``, relative to the root."""
        return f"model={self.model_fingerprint}/prep={self.prep_fingerprint}"

    @property
    def zarr_prefix(self) -> str:
        """``model=<fp>/prep=<pfp>/activations.zarr``: the Zarr hierarchy root, relative to the root."""
        return f"{self.prefix}/activations.zarr"

    def _index_path(self, batch_id: str) -> str:
        return f"{self.prefix}/index/{batch_id}.json"

    # ------------------------------------------------------------------ index
    def batches(self) -> list[BatchIndex]:
        """Committed batches of this model + preprocessing, oldest first.

        Lists the index folder on every call (one request) and reads only index files not seen
        before (they are immutable once written).
        """
        names = self.target.list_dir(f"{self.prefix}/index")
        ids = sorted(n[: -len(".json")] for n in names if n.endswith(".json"))
        new = [i for i in ids if i not in self._known]
        if new:
            raw = self.target.read_many([self._index_path(i) for i in new])
            for batch_id in new:
                self._known[batch_id] = BatchIndex.from_json(raw[self.target.url(self._index_path(batch_id))])
        present = set(ids)
        for stale in [i for i in self._known if i not in present]:
            del self._known[stale]
        return [self._known[i] for i in ids]

    def _location_map(self, batches: Sequence[BatchIndex], layer: str | None) -> dict[str, CacheLocation]:
        key = (tuple(b.batch_id for b in batches), layer)
        cached = self._maps.get(key)
        if cached is not None:
            return cached
        mapping: dict[str, CacheLocation] = {}
        for batch in batches:  # oldest first: newer batches overwrite duplicates
            if layer is not None and layer not in batch.layers:
                continue
            for row, content_hash in enumerate(batch.hashes):
                mapping[content_hash] = CacheLocation(batch.batch_id, row)
        self._maps = {k: v for k, v in self._maps.items() if k[0] == key[0]}
        self._maps[key] = mapping
        return mapping

    def lookup(self, hashes: Sequence[str], layer: str | None = None) -> dict[str, CacheLocation]:
        """Locations of the cached ``hashes`` (absent keys are not cached).

        Args:
            hashes: image content hashes.
            layer: when given, only entries that also hold this layer's feature map.
        """
        mapping = self._location_map(self.batches(), layer)
        return {h: mapping[h] for h in hashes if h in mapping}

    def dtype_for(self, layer: str) -> str:
        """The dtype this instance stores ``layer``'s feature maps in."""
        return self.layer_dtypes.get(layer, self.feature_dtype)

    def stored_layer_dtypes(self, hashes: Sequence[str], layer: str) -> dict[str, str]:
        """Per cached hash (with ``layer``), the dtype its ``layer`` feature map is stored in."""
        batches = {b.batch_id: b for b in self.batches()}
        found = self.lookup(hashes, layer)
        return {h: (batches[loc.batch_id].layer_dtypes or {}).get(layer, "float16") for h, loc in found.items()}

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self.lookup([content_hash])

    # ------------------------------------------------------------------ reading
    def _read_rows(
        self, store: Any, paths_rows: Mapping[str, np.ndarray], whole: bool
    ) -> dict[str, np.ndarray]:
        """Read ``rows`` of each array path (relative to activations.zarr), concurrently."""
        import zarr

        def read(item: tuple[str, np.ndarray]) -> tuple[str, np.ndarray]:
            path, rows = item
            try:
                array = zarr.open_array(store, path=path, mode="r")
            except Exception as error:  # noqa: BLE001 - metadata gone or garbled: every row damaged
                if is_transient(error):
                    raise
                return path, self._unreadable_rows(path, rows)
            try:
                if whole:
                    data = np.asarray(array[...])
                    return path, data if rows is None else data[rows]
                return path, np.asarray(array.oindex[rows])
            except Exception as error:  # noqa: BLE001 - a chunk cut short or garbled: find which rows
                if is_transient(error):
                    raise
                return path, _row_by_row(array, rows)

        items = list(paths_rows.items())
        if len(items) <= 1:
            return dict(read(item) for item in items)
        with ThreadPoolExecutor(max_workers=min(_MAX_READ_THREADS, len(items))) as pool:
            return dict(pool.map(read, items))

    def _unreadable_rows(self, path: str, rows: np.ndarray | None) -> np.ndarray:
        """NaN rows (damaged by :func:`_bad_values`) for an array that cannot be opened at all."""
        batch = self._known.get(path.split("/", 1)[0])
        count = len(rows) if rows is not None else (len(batch.hashes) if batch else 0)
        tail = tuple(batch.embedding_shape[1:]) if batch and path == batch.embeddings_path else (1,)
        return np.full((count, *tail), np.nan, dtype=np.float32)

    def _gather(
        self, hashes: Sequence[str], layer: str | None
    ) -> tuple[dict[str, BatchIndex], dict[str, CacheLocation]]:
        batches = self.batches()
        mapping = self._location_map(batches, layer)
        missing = [h for h in hashes if h not in mapping]
        if missing:
            what = f"{self.prefix}" + (f" layer {layer!r}" if layer is not None else "")
            raise CacheMissError(missing, what)
        by_id = {b.batch_id: b for b in batches}
        return by_id, mapping

    def _assemble(
        self,
        hashes: Sequence[str],
        mapping: Mapping[str, CacheLocation],
        path_of: Mapping[str, str],
        whole: bool,
        embeddings: bool,
    ) -> np.ndarray:
        wanted: dict[str, set[int]] = {}
        for h in hashes:
            loc = mapping[h]
            wanted.setdefault(loc.batch_id, set()).add(loc.row)
        rows = {bid: np.array(sorted(r), dtype=np.int64) for bid, r in wanted.items()}
        store = self.target.zarr_store(self.zarr_prefix, read_only=True)
        data = self._read_rows(store, {path_of[bid]: rows[bid] for bid in rows}, whole)
        damaged = self._damaged_rows(data, path_of, rows, embeddings)
        bad = [h for h in hashes if (mapping[h].batch_id, mapping[h].row) in damaged]
        if bad:
            raise CacheIntegrityError(bad, self.prefix)
        shapes = {arr.shape[1:] for arr in data.values()}
        if len(shapes) > 1:
            raise ShapeError("cached arrays", next(iter(shapes)), f"one common shape, found {sorted(shapes)}")
        first = next(iter(data.values()))
        out = np.empty((len(hashes), *first.shape[1:]), dtype=np.float32)
        for i, h in enumerate(hashes):
            loc = mapping[h]
            position = int(np.searchsorted(rows[loc.batch_id], loc.row))
            out[i] = data[path_of[loc.batch_id]][position]
        return out

    def _damaged_rows(self, data: Mapping[str, np.ndarray], path_of: Mapping[str, str],
                      rows: Mapping[str, np.ndarray], embeddings: bool) -> set[tuple[str, int]]:
        """``(batch_id, row)`` of the rows read that fail their checksum or the value checks."""
        damaged: set[tuple[str, int]] = set()
        for batch_id, wanted in rows.items():
            path = path_of[batch_id]
            values = data[path]
            expected = (self._known[batch_id].checksums or {}).get(path) if batch_id in self._known else None
            got = row_checksums(values) if expected else None
            bad_values = _bad_values(values, embeddings)
            for position, row in enumerate(wanted):
                if bad_values[position] or (expected and got[position] != expected[int(row)]):
                    damaged.add((batch_id, int(row)))
        return damaged

    def damaged(self, hashes: Sequence[str]) -> list[str]:
        """The cached ``hashes`` whose embedding fails its checksum or value checks (to recompute).

        Reads the embedding rows of the given hashes (feature maps are verified when read).
        """
        batches = self.batches()
        mapping = self._location_map(batches, None)
        present = [h for h in hashes if h in mapping]
        if not present:
            return []
        by_id = {b.batch_id: b for b in batches}
        wanted: dict[str, set[int]] = {}
        for h in present:
            wanted.setdefault(mapping[h].batch_id, set()).add(mapping[h].row)
        rows = {bid: np.array(sorted(r), dtype=np.int64) for bid, r in wanted.items()}
        path_of = {bid: by_id[bid].embeddings_path for bid in rows}
        store = self.target.zarr_store(self.zarr_prefix, read_only=True)
        data = self._read_rows(store, {path_of[bid]: rows[bid] for bid in rows}, whole=True)
        damaged = self._damaged_rows(data, path_of, rows, embeddings=True)
        return [h for h in present if (mapping[h].batch_id, mapping[h].row) in damaged]

    def get_embeddings(self, hashes: Sequence[str]) -> np.ndarray:
        """Embeddings of ``hashes`` in the given order: ``(N, D)`` float32.

        Raises:
            CacheMissError: some hashes are not cached.
            CacheIntegrityError: some of their rows are damaged (see :meth:`damaged`).
        """
        hashes = list(hashes)
        if not hashes:
            return np.zeros((0, 0), dtype=np.float32)
        by_id, mapping = self._gather(hashes, None)
        path_of = {bid: b.embeddings_path for bid, b in by_id.items()}
        return self._assemble(hashes, mapping, path_of, whole=True, embeddings=True)

    def get_features(self, hashes: Sequence[str], layer: str) -> np.ndarray:
        """Feature maps of ``layer`` for ``hashes`` in the given order: ``(N, C, h, w)`` float32.

        Reads only the rows asked for (one chunk per row).

        Raises:
            CacheMissError: some hashes are not cached with this layer.
        """
        hashes = list(hashes)
        if not hashes:
            return np.zeros((0, 0, 0, 0), dtype=np.float32)
        by_id, mapping = self._gather(hashes, layer)
        path_of = {bid: b.layers[layer] for bid, b in by_id.items() if layer in b.layers}
        return self._assemble(hashes, mapping, path_of, whole=False, embeddings=False)

    def embedding_matrix(self) -> tuple[list[str], np.ndarray]:
        """Every cached embedding of this model + preprocessing.

        Returns:
            ``(hashes, matrix)``: ``N`` distinct hashes (batch order, oldest first) and their
            ``(N, D)`` float32 embeddings. Each batch array is read whole in one request, batches
            concurrently. Damaged rows are left out (listed in ``self.last_damaged``).
        """
        batches = self.batches()
        if not batches:
            return [], np.zeros((0, 0), dtype=np.float32)
        mapping = self._location_map(batches, None)
        store = self.target.zarr_store(self.zarr_prefix, read_only=True)
        data = self._read_rows(store, {b.embeddings_path: None for b in batches}, whole=True)  # type: ignore[misc]
        dims = {data[b.embeddings_path].shape[1] for b in batches}
        if len(dims) > 1:
            raise ShapeError("cached embeddings", (0, next(iter(dims))), f"(N, D) with one D, found {sorted(dims)}")
        everything = {b.batch_id: np.arange(len(b.hashes)) for b in batches}
        damaged = self._damaged_rows(data, {b.batch_id: b.embeddings_path for b in batches}, everything, True)
        self.last_damaged = sorted(batch.hashes[row] for batch in batches for row in range(len(batch.hashes))
                                   if (batch.batch_id, row) in damaged)
        hashes: list[str] = []
        blocks: list[np.ndarray] = []
        for batch in batches:
            keep = [
                row
                for row, h in enumerate(batch.hashes)
                if mapping[h].batch_id == batch.batch_id and mapping[h].row == row
                and (batch.batch_id, row) not in damaged
            ]
            if not keep:
                continue
            array = data[batch.embeddings_path]
            blocks.append(array if len(keep) == len(batch.hashes) else array[keep])
            hashes.extend(batch.hashes[r] for r in keep)
        if not blocks:
            return [], np.zeros((0, 0), dtype=np.float32)
        matrix = np.concatenate(blocks, axis=0).astype(np.float32, copy=False)
        return hashes, matrix

    def verify(self) -> tuple[int, list[str]]:
        """Read every array of every committed batch: ``(rows checked, "<batch>/<array> row <i>" damaged)``.

        A row is damaged when its checksum or value checks fail (a deleted chunk reads as zeros, a
        chunk cut short or garbled does not decode). Only rows that lookups return count: a damaged
        row that a newer batch has replaced (the pipeline recomputed it) is no longer in use.
        """
        store = self.target.zarr_store(self.zarr_prefix, read_only=True)
        batches = self.batches()
        checked, damaged = 0, []
        for batch in batches:
            rows = np.arange(len(batch.hashes))
            arrays = [(batch.embeddings_path, True, None),
                      *((path, False, layer) for layer, path in batch.layers.items())]
            for path, embeddings, layer in arrays:
                current = self._location_map(batches, layer)
                in_use = {row for row, h in enumerate(batch.hashes)
                          if current.get(h) == CacheLocation(batch.batch_id, row)}
                if not in_use:
                    continue
                checked += len(in_use)
                try:
                    data = self._read_rows(store, {path: None}, whole=True)  # type: ignore[dict-item]
                    bad = sorted(row for _, row in self._damaged_rows(data, {batch.batch_id: path},
                                                                       {batch.batch_id: rows}, embeddings))
                except Exception as error:  # noqa: BLE001 - unreadable metadata or chunks: all rows damaged
                    if is_transient(error):
                        raise
                    bad = list(rows)
                damaged += [f"{self.prefix}/{path} row {row}" for row in bad if row in in_use]
        return checked, damaged

    # ------------------------------------------------------------------ writing
    def put(
        self,
        hashes: Sequence[str],
        embeddings: np.ndarray,
        features: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Store one batch; visible to lookups only once complete.

        Args:
            hashes: ``N`` distinct content hashes.
            embeddings: ``(N, D)`` (numpy, or a torch tensor on any device).
            features: layer name -> ``(N, C, h, w)`` feature maps (may be empty).

        Returns:
            The new batch id.

        Raises:
            ShapeError: array shapes do not match ``N``.
            ConfigError: duplicate/empty hashes, or values that overflow the stored dtype.
        """
        hashes, emb, feats, keys = _validated_batch(hashes, embeddings, features)
        emb_stored = self._cast(emb, self.embedding_dtype, "embeddings")
        feats_stored = {
            layer: self._cast(a, self.dtype_for(layer), f"features[{layer!r}]")
            for layer, a in feats.items()
        }
        for name, values, is_embedding in [("embeddings", emb_stored, True)] + [
                (f"features[{layer!r}]", v, False) for layer, v in feats_stored.items()]:
            bad = _bad_values(values, is_embedding)
            if bad.any():
                what = "NaN/Inf or all zero" if is_embedding else "NaN/Inf"
                raise ConfigError(f"{name}: {int(bad.sum())} row(s) are {what}; refusing to cache them")

        batch_id = _new_batch_id()
        created_at = datetime.now(timezone.utc).isoformat()
        layer_specs = self._write_arrays(batch_id, hashes, keys, emb_stored, feats_stored, created_at)
        index = {
            "format": _INDEX_FORMAT,
            "batch_id": batch_id,
            "model_fingerprint": self.model_fingerprint,
            "prep_fingerprint": self.prep_fingerprint,
            "created_at": created_at,
            "hashes": hashes,
            "embeddings": {
                "path": f"{batch_id}/embeddings",
                "shape": list(emb_stored.shape),
                "dtype": emb_stored.dtype.name,
            },
            "layers": layer_specs,
            "checksums": {"embeddings": row_checksums(emb_stored),
                          "layers": {layer: row_checksums(v) for layer, v in feats_stored.items()}},
        }
        self._commit_index(batch_id, json.dumps(index, indent=1).encode())
        return batch_id

    def _write_arrays(self, batch_id: str, hashes: list[str], keys: Mapping[str, str], emb_stored: np.ndarray,
                      feats_stored: Mapping[str, np.ndarray], created_at: str) -> dict[str, dict[str, Any]]:
        """Write a batch's Zarr group (embeddings whole, feature maps one chunk per row); the
        index entries of its feature arrays by layer."""
        import zarr

        store = self.target.zarr_store(self.zarr_prefix)
        group = zarr.create_group(
            store,
            path=batch_id,
            attributes={"hashes": hashes, "layers": dict(keys), "created_at": created_at},
        )
        array = group.create_array(
            "embeddings",
            shape=emb_stored.shape,
            dtype=emb_stored.dtype,
            chunks=emb_stored.shape,
            dimension_names=("row", "dim"),
        )
        array[...] = emb_stored
        layer_specs: dict[str, dict[str, Any]] = {}
        if feats_stored:
            feature_group = group.create_group("features")
            for layer, values in feats_stored.items():
                fmap = feature_group.create_array(
                    keys[layer],
                    shape=values.shape,
                    dtype=values.dtype,
                    chunks=(1, *values.shape[1:]),
                    dimension_names=("row", "channel", "y", "x"),
                    attributes={"layer": layer},
                )
                fmap[...] = values
                layer_specs[layer] = {
                    "path": f"{batch_id}/features/{keys[layer]}",
                    "shape": list(values.shape),
                    "dtype": values.dtype.name,
                }
        return layer_specs

    def _commit_index(self, batch_id: str, payload: bytes) -> None:
        """Write the index file: the step that makes a batch visible (tests patch it)."""
        self.target.write_bytes_atomic(self._index_path(batch_id), payload)

    @staticmethod
    def _cast(values: np.ndarray, dtype: str, name: str) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            stored = np.ascontiguousarray(values, dtype=dtype)
        if values.dtype.kind == "f" and np.dtype(dtype).itemsize < values.dtype.itemsize:
            overflow = np.isinf(stored) & np.isfinite(values)
            if overflow.any():
                raise ConfigError(f"{name}: {int(overflow.sum())} value(s) overflow {dtype}; use a wider dtype")
        return stored

    # ------------------------------------------------------------------ maintenance
    def model_fingerprints(self) -> list[str]:
        """Model fingerprints with a subtree under the root."""
        return [n[len("model="):] for n in self.target.list_dir("") if n.startswith("model=")]

    def size_bytes(self, model_fingerprint: str | None = None) -> int:
        """Bytes under the whole cache root, or under one model's subtree."""
        if model_fingerprint is None:
            return self.target.size_bytes("")
        _check_fingerprint("model_fingerprint", model_fingerprint)
        return self.target.size_bytes(f"model={model_fingerprint}")

    def prune(self, model_fingerprint: str) -> int:
        """Delete every entry of a model (all preprocessings). Returns the bytes freed.

        Index files go first, so entries disappear from lookups before their arrays do.
        """
        _check_fingerprint("model_fingerprint", model_fingerprint)
        model_dir = f"model={model_fingerprint}"
        freed = self.target.size_bytes(model_dir)
        for prep in [n for n in self.target.list_dir(model_dir) if n.startswith("prep=")]:
            self.target.delete(f"{model_dir}/{prep}/index", recursive=True)
        self.target.delete(model_dir, recursive=True)
        if model_fingerprint == self.model_fingerprint:
            self._known.clear()
            self._maps.clear()
        return freed

    def prep_fingerprints(self, model_fingerprint: str | None = None) -> list[str]:
        """Preprocessing fingerprints with entries under a model (default: this instance's)."""
        model_dir = f"model={_check_fingerprint('model_fingerprint', model_fingerprint or self.model_fingerprint)}"
        return [n[len("prep="):] for n in self.target.list_dir(model_dir) if n.startswith("prep=")]

    def prune_older_than(self, age_s: float) -> list[str]:
        """Delete committed batches of this model + preprocessing written more than ``age_s`` ago.

        Index files go first (entries vanish from lookups), then the arrays; an image whose
        newest batch is removed is simply embedded again by the next run. Returns the batch ids.
        """
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=age_s)
        removed = []
        for batch in self.batches():
            stamp = _batch_time(batch.batch_id)
            if stamp is None or stamp > cutoff:
                continue
            self.target.delete(self._index_path(batch.batch_id))
            self.target.delete(f"{self.zarr_prefix}/{batch.batch_id}", recursive=True)
            removed.append(batch.batch_id)
        self._known = {k: v for k, v in self._known.items() if k not in removed}
        self._maps.clear()
        return removed

    def collect_garbage(self, min_age_s: float = 24 * 3600.0) -> list[str]:
        """Delete batches of this model + preprocessing that never got an index file.

        Only batches older than ``min_age_s`` (by the timestamp in their id) are touched, so a
        writer still at work is safe. Returns the deleted batch ids.
        """
        committed = {b.batch_id for b in self.batches()}
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=min_age_s)
        removed = []
        for name in self.target.list_dir(self.zarr_prefix):
            stamp = _batch_time(name)
            if name in committed or stamp is None or stamp > cutoff:
                continue
            self.target.delete(f"{self.zarr_prefix}/{name}", recursive=True)
            removed.append(name)
        return removed


#: dtype of the explained layers' cached feature maps: stage 1 of re-ranking reads them back
EXACT_FEATURE_DTYPE = "float32"


def activation_cache(cache_url: str, model_fingerprint: str, prep_fingerprint: str, layers: Sequence[str],
                     storage_options: Mapping[str, Any] | None = None) -> ActivationCache:
    """The pipeline's cache of one model + preprocessing: the explained ``layers`` stored float32."""
    return ActivationCache(cache_url, model_fingerprint, prep_fingerprint, storage_options=storage_options,
                           layer_dtypes={layer: EXACT_FEATURE_DTYPE for layer in layers})
