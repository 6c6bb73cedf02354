"""Flow: new uploads vs. a gallery: embed (cached), retrieve, re-rank from the cache, explain, rank.

With ``rerank_k`` > ``top_k`` (default 5 and 3) each upload's ``rerank_k`` most similar gallery images are
re-ranked by PAIR-X plausibility: the ``top_k`` most similar explained in full, the others judged by stage 1
from the activation cache, any lifted into the final ``top_k`` explained too (``flows.rerank``);
otherwise (``rerank_k`` 0 or at most ``top_k``) the ``top_k`` by similarity are explained.

The night works on items (``infra.night_items.NightItem``: a photo, a box, a rotation), not file
names: with a detector file (``--detections``) each kept detection is one upload item, cut from
its frame; a gallery manifest's rows and confirmed uploads of earlier nights are gallery items.

``nightly`` is the entry flow (CLI and deployments); ``nightly_work`` runs on the Dask task
runner the config asks for (see ``flows.common``).
"""

from __future__ import annotations

import contextlib
import time

from prefect import flow, get_run_logger

from infra.cluster import gpu_annotation
from infra.inputs import PairItem, derive_pair_id
from infra.keys import OutputSettings
from infra.night_items import NightItem, pair_item
from infra.records import query_item_columns
from infra.storage import with_retries
from infra.tables import write_table
from pairx_core.retrieval import Candidate, retrieve
from tasks.candidates import candidate_keys, candidate_rows, once_per_key
from tasks.embed import activation_cache, embed_images_task

from . import run_context
from .common import cancel_pending, explain_items, notify, run_recorded, settings_for
from .config import NightlyConfig
from .night_plan import NightPlan, plan_uploads, record_detector_failures, reuse_early_night, warn_quarantined
from .rerank import plan_reranked, reranked_rows


def plan_night(config: NightlyConfig, summary) -> NightPlan:
    """Resolve the model and plan the night (:func:`flows.night_plan.plan_uploads`); count the skips.

    The run's model and a night the CLI planned before the run took the lease come from the run's
    context (:mod:`flows.run_context`): each is worked out once per run.
    """
    logger = get_run_logger()
    model = run_context.model_plan(config)
    summary.model_id, summary.model_facts = model.model_id, model.facts
    context = run_context.current()
    early = context.early_night if context is not None else None
    night = reuse_early_night(early, config, model) if early is not None else None
    if night is None:
        night = plan_uploads(config, model)
    summary.skipped += len(night.uploads) - len(night.new_uploads)
    summary.planned = night.counts(config.top_k)
    notify(summary)
    if not night.uploads:
        logger.info("no uploads in %s: a quiet night", config.uploads)
    logger.info("%d uploads (%d new), %d gallery images, model %s, layer %s", len(night.uploads),
                len(night.new_uploads), len(night.gallery), model.facts["model_spec"], ",".join(model.layers))
    warn_quarantined(night)
    if night.detector is not None:
        logger.info("detections %s: %s", night.detector.source, night.detector.summary)
        record_detector_failures(config, night, summary.run_id)
    return night


def _prepare(config: NightlyConfig, summary) -> bool:
    """Plan the night in the entry flow; a night with nothing new starts no cluster."""
    night = plan_night(config, summary)
    run_context.for_run(summary.run_id).night = night
    return night.has_work


@flow(name="nightly-work", log_prints=True)
def nightly_work(config: NightlyConfig, run_id: str) -> None:
    """Embed, retrieve, explain and rank tonight's new uploads (as planned by :func:`plan_night`)."""
    context = run_context.for_run(run_id)
    summary = context.summary
    so = config.storage_options or None
    night = context.night or plan_night(config, summary)
    model_id, layers = night.model.model_id, night.model.layers
    gallery, new_uploads = night.gallery, night.new_uploads
    if not night.has_work:
        return
    annotations = gpu_annotation(config.device)
    import dask

    kwargs = dict(model=config.model, cache_url=config.cache_url, layers=list(layers), run_id=run_id,
                  out=config.out, device=config.device, storage_options=so, min_image_side=config.min_image_side)
    phase_started = time.perf_counter()
    items = [night.item(name) for name in list(gallery) + new_uploads]
    batches = _photo_chunks(items, 32)
    summary.advance("embed", planned=len(items))
    with dask.annotate(**annotations) if annotations else contextlib.nullcontext():
        futures = [embed_images_task.submit(batch, **kwargs) for batch in batches]
    hashes: dict[str, str] = {}  # item name -> activation-cache key
    contents: dict[str, str] = {}  # item name -> content hash of its photo
    boxes: dict[str, tuple[int, int, int, int] | None] = {}  # item name -> crop in original pixels
    try:
        for future, batch in zip(futures, batches):
            result = future.result()
            summary.advance("embed", len(batch))
            hashes.update(result.hashes)
            contents.update(result.contents)
            boxes.update(result.boxes)
            summary.failed += result.errors
            summary.cache["hits"] += result.cached
            summary.cache["misses"] += result.computed
            summary.cache["damaged"] += result.damaged
            notify(summary)
    except BaseException:
        cancel_pending(futures)
        raise
    phase_started = _add_wall(summary, "embed_wall", phase_started)
    cache = activation_cache(config.cache_url, model_id, _prep_fingerprint(config), layers, so)
    gallery_uris = [g for g in gallery if g in hashes]
    query_uris = [u for u in new_uploads if u in hashes]
    if not (query_uris and gallery_uris):
        query_matrix = gallery_matrix = None
    else:
        gallery_matrix = with_retries(cache.get_embeddings, [hashes[g] for g in gallery_uris])
        query_matrix = with_retries(cache.get_embeddings, [hashes[q] for q in query_uris])
    phase_started = _add_wall(summary, "embeddings_read_wall", phase_started)

    def make_item(candidate: Candidate) -> PairItem:
        return pair_item(night.item(candidate.query), night.item(candidate.gallery_image), boxes,
                         candidate.individual)

    if config.rerank_k and not config.reranks:
        summary.planned["rerank"] = f"off: rerank_k {config.rerank_k} is not more than top_k {config.top_k}"
    if config.reranks and query_matrix is not None:  # top_k explained, the rest judged by stage 1 (flows.rerank)
        pairs_planned = 0  # the plan's estimate is replaced by the rounds' pairs

        def explain(items: list[PairItem]) -> None:  # called once per round
            nonlocal pairs_planned
            pairs_planned += len(items)
            summary.planned["pairs_planned"] = pairs_planned
            explain_items(items, settings_for(config, run_id, layers), config.batch_pairs, summary, annotations)

        reranked = plan_reranked(config, layers[0], query_matrix, gallery_matrix, query_uris, gallery_uris,
                                 gallery, hashes, summary, annotations, _key_settings(config, run_id, layers),
                                 explain, contents, make_item)
        summary.planned["stage1_pairs"] = len(reranked.judged)
        explain(reranked.items)
        phase_started = time.perf_counter()
        rows = reranked_rows(config.out, model_id, config.model, layers[0], reranked, so)
    else:
        candidates = [] if query_matrix is None else retrieve(
            query_matrix, gallery_matrix, query_uris, gallery_uris, gallery, config.top_k, derive_pair_id)[0]
        pair_items = {c.pair_id: make_item(c) for c in candidates}
        keys = candidate_keys(candidates, contents, _key_settings(config, run_id, layers), layers[0], pair_items)
        items = once_per_key([pair_items[c.pair_id] for c in candidates], keys)
        summary.planned["pairs_planned"] = len(items)
        explain_items(items, settings_for(config, run_id, layers), config.batch_pairs, summary, annotations)
        # this run's explanations and those of earlier runs, read back from `pairs` by output key
        phase_started = time.perf_counter()
        rows = candidate_rows(config.out, model_id, config.model, layers[0], candidates, keys, so)
    for row in rows:  # an upload is done per name, content and detection (flows.night_plan.plan_uploads)
        row.update(query_item_columns(night.item(row["query"]), contents[row["query"]], boxes.get(row["query"])))
        gallery_item = night.item(row["gallery_image"])
        row["gallery_image"], row["gallery_source"] = gallery_item.uri, gallery_item.source
        row["top_k"] = config.top_k  # the rows ranked below it are the night's choice for review
    write_table(config.out, "candidates", rows, model_id, run_id, so)
    _add_wall(summary, "candidates_wall", phase_started)


def _add_wall(summary, phase: str, started: float) -> float:
    """Add the seconds since ``started`` to ``summary.stage_seconds[phase]``; returns now."""
    now = time.perf_counter()
    summary.stage_seconds[phase] = summary.stage_seconds.get(phase, 0.0) + now - started
    return now


def _photo_chunks(items: list[NightItem], size: int) -> list[list[NightItem]]:
    """``items`` in chunks of about ``size``, all items of one photo in one chunk (one decode each)."""
    by_photo: dict[str, list[NightItem]] = {}
    for item in items:
        by_photo.setdefault(item.uri, []).append(item)
    batches: list[list[NightItem]] = [[]]
    for photo_items in by_photo.values():
        if batches[-1] and len(batches[-1]) + len(photo_items) > size:
            batches.append([])
        batches[-1].extend(photo_items)
    return [batch for batch in batches if batch]


def _key_settings(config: NightlyConfig, run_id: str, layers) -> OutputSettings:
    """What the explain batches key their outputs with (the same recipe, computed here)."""
    from tasks.explain import _output_settings
    from infra.model_runtime import get_model

    model = get_model(config.model, "cpu", config.storage_options or None)
    return _output_settings(settings_for(config, run_id, layers), model)


def _prep_fingerprint(config: NightlyConfig) -> str:
    from infra.model_runtime import get_model

    return get_model(config.model, "cpu", config.storage_options or None).preprocessing.fingerprint()


@flow(name="nightly", log_prints=True)
def nightly(config: NightlyConfig) -> dict:
    """New uploads vs. the gallery on the Dask cluster the config names (deployment entrypoint).

    Ends ``Failed`` when any item failed (:class:`flows.common.ItemsFailedError`); the ``runs``
    row is written whatever happens.
    """
    return run_recorded("nightly", config, nightly_work, prepare=_prepare)
