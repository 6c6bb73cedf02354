"""Flow: new uploads vs. a gallery: embed (cached), retrieve top-k, explain, rank candidates."""

from __future__ import annotations

import contextlib
import io
from datetime import datetime, timezone

import pandas as pd
from prefect import flow, get_run_logger

from infra.cache import ActivationCache
from infra.cluster import gpu_annotation, make_task_runner
from infra.storage import StorageTarget
from infra.tables import read_table, write_table
from pairx_core.errors import ConfigError
from pairx_core.retrieval import Candidate
from tasks.candidates import candidate_rows
from tasks.embed import embed_images_task, top_k
from tasks.explain import PairItem, derive_pair_id
from tasks.runtime import model_identity

from . import progress as progress_hooks
from .common import FlowSummary, chunks, explain_items, new_run_id, settings_for, write_run
from .config import NightlyConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def list_gallery(gallery: str, storage_options=None) -> dict[str, str]:
    """Gallery image URL -> individual, from a manifest CSV or one folder per individual."""
    target = StorageTarget.from_url(gallery, storage_options)
    if gallery.endswith(".csv"):
        frame = pd.read_csv(io.BytesIO(target.read_bytes("")))
        if not {"image", "individual"} <= set(frame.columns):
            raise ConfigError(f"{gallery}: manifest needs columns image, individual")
        if "role" in frame.columns:  # a manifest of a whole dataset: keep the gallery rows
            frame = frame[frame["role"].astype(str) == "gallery"]
        base = StorageTarget.from_url(gallery.rsplit("/", 1)[0], storage_options)
        return {(r["image"] if "://" in str(r["image"]) or str(r["image"]).startswith("/") else base.join(str(r["image"]))):
                str(r["individual"]) for r in frame.to_dict("records")}
    mapping = {}
    for uri in target.list_files("", suffixes=IMAGE_SUFFIXES):
        relative = uri[len(target.url("")):].lstrip("/")
        mapping[uri] = relative.split("/")[0] if "/" in relative else ""
    return mapping


def unreadable_uploads(out: str, model_id: str, storage_options=None) -> set[str]:
    """Images that an earlier run could not load (bad input, recorded in ``errors``, stage ``load``).

    Transient failures are retried inside a run and never recorded there, so these are files
    that are broken as stored; retrying them every night would only repeat the error rows.
    """
    errors = read_table(out, "errors", model_id=model_id, columns=["item", "stage"], storage_options=storage_options)
    return set(errors.loc[errors.stage == "load", "item"])


@flow(name="nightly", log_prints=True)
def nightly(config: NightlyConfig) -> dict:
    """Identify new uploads: candidates, their PAIR-X pictures, and a re-ranked candidates table."""
    logger = get_run_logger()
    started = datetime.now(timezone.utc)
    so = config.storage_options or None
    model_id, prep = model_identity(config.model, so)
    summary = FlowSummary(run_id=new_run_id(), model_id=model_id)
    gallery = list_gallery(config.gallery, so)
    uploads = StorageTarget.from_url(config.uploads, so).list_files("", suffixes=IMAGE_SUFFIXES)
    done_queries = set(read_table(config.out, "candidates", model_id=model_id, columns=["query"],
                                  storage_options=so)["query"])
    failed_before = set() if config.retry_failed else unreadable_uploads(config.out, model_id, so)
    new_uploads = [u for u in uploads if u not in done_queries and u not in gallery and u not in failed_before]
    summary.skipped += len(uploads) - len(new_uploads)
    logger.info("%d uploads (%d new), %d gallery images", len(uploads), len(new_uploads), len(gallery))
    quarantined = failed_before.intersection(uploads)
    if quarantined:
        logger.warning("skipping %d upload(s) that failed to load on an earlier night (see the errors table; "
                       "--retry-failed tries them again): %s", len(quarantined), sorted(quarantined)[:5])
    if new_uploads and gallery:
        annotations = gpu_annotation(config.device)
        import dask

        kwargs = dict(model=config.model, cache_url=config.cache_url, layers=config.layers, run_id=summary.run_id,
                      out=config.out, device=config.device, storage_options=so)
        images = list(gallery) + new_uploads
        with dask.annotate(**annotations) if annotations else contextlib.nullcontext():
            futures = [embed_images_task.submit(batch, **kwargs) for batch in chunks(images, 32)]
        hashes: dict[str, str] = {}
        for future in futures:
            result = future.result()
            hashes.update(result.hashes)
            summary.failed += result.errors
        cache = ActivationCache(config.cache_url, model_id, prep.fingerprint(), storage_options=so)
        gallery_uris = [g for g in gallery if g in hashes]
        query_uris = [u for u in new_uploads if u in hashes]
        items, candidates = [], []
        if query_uris and gallery_uris:
            gallery_matrix = cache.get_embeddings([hashes[g] for g in gallery_uris])
            query_matrix = cache.get_embeddings([hashes[q] for q in query_uris])
            order, scores = top_k(query_matrix, gallery_matrix, config.top_k)
        else:
            order, scores = [], []
        for qi, query in enumerate(query_uris):
            for rank, (gi, score) in enumerate(zip(order[qi], scores[qi])):
                candidate = gallery_uris[gi]
                pair_id = derive_pair_id(query, candidate)
                items.append(PairItem(pair_id, query, candidate, individual_1=gallery[candidate] or None))
                candidates.append(Candidate(query, candidate, float(score), pair_id, gallery[candidate] or None))
        explain_items(items, settings_for(config, summary.run_id), config.batch_pairs, summary, annotations,
                      progress_hooks.current())
        # this run's explanations and those of an earlier, interrupted run, read back from `pairs`
        rows = candidate_rows(config.out, model_id, config.model, config.layers[0], candidates, so)
        write_table(config.out, "candidates", rows, model_id, summary.run_id, so)
    write_run(config.out, "nightly", config, summary, started, so)
    logger.info("summary: %s", summary.as_dict())
    return summary.as_dict()


def run_nightly(config: NightlyConfig) -> dict:
    runner = make_task_runner(config.cluster, config.workers, config.device)
    return nightly.with_options(task_runner=runner)(config)
