#!/usr/bin/env python3
"""Big galleries: retrieval against cached embeddings, and what 30 nights do to the Parquet tables.

Part 1, per gallery size (``--galleries``, default 1k, 5k, 20k): a synthetic gallery of unit
vectors (``--dim``, MiewID's 2152 by default) stored in the real ``infra.cache.ActivationCache``
(local folder, ``--cache-batch`` images per stored batch, as the embed task writes them), then:

- ``load_s``: ``ActivationCache.embedding_matrix()``; ``matrix_bytes`` and ``load_peak_bytes``
  (tracemalloc peak during the load: the matrix plus decode buffers); ``cache_bytes`` on disk;
- ``retrieval_s``: ``pairx_core.retrieval.top_k`` of ``--uploads`` queries (default 1,000) against the
  matrix (the pipeline's own function: a partial selection of each row's top k) and
  ``retrieval_full_sort_s``, the same top-k by a stable argsort of every row (what the pipeline
  did before; identical results are checked).

Part 2: ``--nights`` nights (default 30) of ``--uploads`` uploads, each explained against
``--top-k`` candidates at one layer, written with ``infra.tables.write_table`` as the pipeline
does: ``pairs`` and ``matches`` (``--k-lines`` rows per pair) once per explain batch of
``--batch-pairs`` pairs, ``images`` once per embed batch, ``candidates`` and ``runs`` once per
night. Prints files and bytes per night, then times the README's DuckDB dashboard query over
``pairs`` (and a count over ``matches``) before and after ``infra.tables.compact_table``.

One JSON line per measurement. Example::

    python bench/gallery.py                       # all defaults (a few minutes on 2 cores)
    python bench/gallery.py --galleries 1000 --nights 3 --uploads 200   # quick
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from infra.cache import ActivationCache  # noqa: E402
from infra.tables import compact_table, with_nulls, write_table  # noqa: E402

DASHBOARD_QUERY = """
SELECT date, model, layer, count(*) AS pairs, avg(similarity) AS mean_similarity,
       avg(match_coverage) AS mean_coverage, max(created_at) AS last_written
FROM read_parquet('{root}/tables/pairs/**/*.parquet', hive_partitioning = true)
GROUP BY ALL
ORDER BY date DESC, model, layer
LIMIT 100
"""
MATCHES_QUERY = """
SELECT count(*), avg(relevance) FROM read_parquet('{root}/tables/matches/**/*.parquet', hive_partitioning = true)
"""


def emit(record: dict) -> None:
    record["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(record), flush=True)


def _embedding_matrix(cache_dir: Path):
    """The gallery's ``(hashes, (N, D) matrix)`` read back from the bench's cache folder."""
    return ActivationCache(str(cache_dir), "bench-model", "bench-prep").embedding_matrix()


def _median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _top_k_full_sort(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from pairx_core.retrieval import cosine_similarities

    scores = cosine_similarities(query, gallery)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :min(k, gallery.shape[0])]
    return order, np.take_along_axis(scores, order, axis=1)


# ------------------------------------------------------------------------------------ retrieval
def bench_retrieval(args: argparse.Namespace, work: Path) -> None:
    from pairx_core.retrieval import top_k  # the pipeline's own retrieval

    rng = np.random.default_rng(args.seed)
    queries = rng.standard_normal((args.uploads, args.dim)).astype(np.float32)
    for size in args.galleries:
        cache_dir = work / f"cache-{size}"
        cache = ActivationCache(str(cache_dir), "bench-model", "bench-prep")
        gallery = rng.standard_normal((size, args.dim)).astype(np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        start = time.perf_counter()
        for first in range(0, size, args.cache_batch):
            rows = range(first, min(size, first + args.cache_batch))
            cache.put([f"h{size}-{i:07d}" for i in rows], gallery[first:first + len(rows)])
        put_s = time.perf_counter() - start

        tracemalloc.start()
        start = time.perf_counter()
        hashes, matrix = _embedding_matrix(cache_dir)
        load_s = time.perf_counter() - start
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(hashes) == size and np.array_equal(matrix, gallery)
        load_s = min(load_s, _median_time(
            functools.partial(_embedding_matrix, cache_dir), args.repeats))

        retrieval_s = _median_time(functools.partial(top_k, queries, matrix, args.top_k), args.repeats)
        full_sort_s = _median_time(functools.partial(_top_k_full_sort, queries, matrix, args.top_k), args.repeats)
        order, _ = top_k(queries, matrix, args.top_k)
        full_order, _ = _top_k_full_sort(queries, matrix, args.top_k)
        emit({
            "bench": "gallery_retrieval", "gallery": size, "uploads": args.uploads, "dim": args.dim,
            "top_k": args.top_k, "cache_batches": -(-size // args.cache_batch), "put_s": round(put_s, 3),
            "load_s": round(load_s, 3), "matrix_bytes": int(matrix.nbytes), "load_peak_bytes": int(load_peak),
            "cache_bytes": cache.size_bytes(), "retrieval_s": round(retrieval_s, 3),
            "retrieval_full_sort_s": round(full_sort_s, 3), "same_top_k": bool(np.array_equal(order, full_order)),
        })
        shutil.rmtree(cache_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ tables
def _night_rows(args: argparse.Namespace, night: int, rng: np.random.Generator):
    """Yield (table, rows) in the order the pipeline writes them during one night."""
    now = datetime.now(timezone.utc)
    run_id = f"nightly-{night:03d}-{uuid.uuid4().hex[:8]}"
    uploads = [f"s3://camera-traps/2026/night{night:03d}/IMG_{i:05d}.JPG" for i in range(args.uploads)]
    for first in range(0, args.uploads, args.embed_batch):
        chunk = uploads[first:first + args.embed_batch]
        yield run_id, "images", [{"image_uri": u, "content_hash": uuid.uuid4().hex * 2, "width": 4000,
                                  "height": 3000, "embedded_at": now} for u in chunk]
    pairs = [(u, f"s3://gallery/ind{rng.integers(0, 5000):05d}/img{rng.integers(0, 20):02d}.jpg", r)
             for u in uploads for r in range(args.top_k)]
    for first in range(0, len(pairs), args.batch_pairs):
        pair_rows, match_rows = [], []
        for image_0, image_1, _ in pairs[first:first + args.batch_pairs]:
            pair_id, key = uuid.uuid4().hex[:16], uuid.uuid4().hex * 2
            residual = float(rng.uniform(0, 30))
            pair_rows.append({
                "pair_id": pair_id, "image_0": image_0, "image_1": image_1, "layer": "backbone.blocks.3",
                "similarity": float(rng.uniform(0.2, 0.95)), "n_matches": int(rng.integers(60, 400)),
                "residual_px": residual, "inliers": int(rng.integers(0, 20)), "irm": 1.0 / (1.0 + residual),
                "match_coverage": float(rng.uniform(0, 1)), "relevance_share": float(rng.uniform(0, 1)),
                "match_share": float(rng.uniform(0, 0.5)),
                "viz_uri": f"s3://out/viz/{pair_id}.png", "box_0": None, "box_1": None,
                "theta_0": 0.0, "theta_1": 0.0, "output_key": key,
            })
            xy = rng.uniform(0, 4000, size=(args.k_lines, 4))
            match_rows.extend({
                "pair_id": pair_id, "layer": "backbone.blocks.3", "rank": rank,
                "x_0": float(xy[rank, 0]), "y_0": float(xy[rank, 1]), "x_1": float(xy[rank, 2]),
                "y_1": float(xy[rank, 3]), "distance": float(rng.uniform(0, 10)),
                "relevance": float(rng.uniform(0, 1)), "output_key": key,
            } for rank in range(args.k_lines))
        yield run_id, "pairs", pair_rows
        yield run_id, "matches", match_rows
    yield run_id, "candidates", [{"query": u, "rank": r, "gallery_image": g, "individual": None,
                                  "similarity": float(rng.uniform(0, 1)), "irm": None,
                                  "rerank_score": float(rng.uniform(0, 1))} for u, g, r in pairs]
    yield run_id, "runs", [{"run_id": run_id, "flow": "nightly", "parameters": "{}", "n_done": len(pairs),
                            "n_skipped": 0, "n_failed": 0, "duration_s": 3600.0, "started_at": now,
                            "finished_at": now}]


def _tree(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*.parquet")]
    return len(files), sum(p.stat().st_size for p in files)


def bench_tables(args: argparse.Namespace, work: Path) -> None:
    import duckdb

    out = work / "out"
    rng = np.random.default_rng(args.seed + 1)
    first_night = date(2026, 1, 1)
    previous = (0, 0)
    per_night = []
    start = time.perf_counter()
    for night in range(args.nights):
        day = (first_night + timedelta(days=night)).isoformat()
        for run_id, table, rows in _night_rows(args, night, rng):
            write_table(str(out), table, with_nulls(table, rows), "miewid-v4", run_id, date=day)
        files, size = _tree(out / "tables")
        per_night.append((files - previous[0], size - previous[1]))
        previous = (files, size)
    write_s = time.perf_counter() - start
    by_table = {t.name: _tree(t) for t in sorted((out / "tables").iterdir())}
    emit({
        "bench": "table_growth", "nights": args.nights, "uploads_per_night": args.uploads, "top_k": args.top_k,
        "pairs_per_night": args.uploads * args.top_k, "batch_pairs": args.batch_pairs, "embed_batch": args.embed_batch,
        "files_per_night": statistics.median(f for f, _ in per_night),
        "bytes_per_night": int(statistics.median(b for _, b in per_night)),
        "files_total": previous[0], "bytes_total": previous[1], "write_s": round(write_s, 1),
        "by_table": {name: {"files": f, "bytes": b} for name, (f, b) in by_table.items()},
    })

    def queries() -> dict[str, float]:
        connection = duckdb.connect()
        dashboard = DASHBOARD_QUERY.format(root=out)
        matches = MATCHES_QUERY.format(root=out)
        result = {
            "dashboard_s": _median_time(lambda: connection.execute(dashboard).fetchall(), args.repeats),
            "matches_count_s": _median_time(lambda: connection.execute(matches).fetchall(), args.repeats),
            "pairs_rows": connection.execute(
                f"SELECT count(*) FROM read_parquet('{out}/tables/pairs/**/*.parquet')").fetchall()[0][0],
        }
        connection.close()
        return result

    before = queries()
    start = time.perf_counter()
    compacted = {name: compact_table(str(out), name) for name in by_table}
    compact_s = time.perf_counter() - start
    after = queries()
    files_after, bytes_after = _tree(out / "tables")
    assert after["pairs_rows"] == before["pairs_rows"]
    emit({
        "bench": "table_compaction", "nights": args.nights, "files_before": previous[0], "bytes_before": previous[1],
        "files_after": files_after, "bytes_after": bytes_after, "compact_s": round(compact_s, 2),
        "partitions_compacted": sum(len(v) for v in compacted.values()),
        "dashboard_query_s_before": round(before["dashboard_s"], 3),
        "dashboard_query_s_after": round(after["dashboard_s"], 3),
        "matches_count_s_before": round(before["matches_count_s"], 3),
        "matches_count_s_after": round(after["matches_count_s"], 3),
        "pairs_rows": after["pairs_rows"],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galleries", default="1000,5000,20000", help="comma list of gallery sizes")
    parser.add_argument("--uploads", type=int, default=1000, help="uploads per night (queries)")
    parser.add_argument("--dim", type=int, default=2152, help="embedding size (MiewID: 2152)")
    parser.add_argument("--top-k", type=int, default=5, help="candidates explained per upload")
    parser.add_argument("--cache-batch", type=int, default=256, help="images per stored cache batch")
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--batch-pairs", type=int, default=16, help="pairs per explain batch (one file per table)")
    parser.add_argument("--embed-batch", type=int, default=64, help="uploads per embed batch (one images file)")
    parser.add_argument("--k-lines", type=int, default=20, help="matches rows per pair")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--skip-tables", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to build the cache and tables (default: a temp dir)")
    args = parser.parse_args()
    args.galleries = [int(v) for v in args.galleries.split(",") if v.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pairx-gallery-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_retrieval:
            bench_retrieval(args, work)
        if not args.skip_tables:
            bench_tables(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
