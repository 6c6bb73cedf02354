"""Explain a batch of pairs: read images, call ``pairx_core``, write pictures and tables.

``explain_pairs_batch`` is a plain function (tested directly); ``explain_batch_task`` is its thin
Prefect task. Only small summaries travel back through the scheduler.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.images import DEFAULT_MIN_SIDE, LoadedImage, load_image
from infra.inputs import PairItem, derive_pair_id, parse_angle, parse_box  # noqa: F401 - re-exported
from infra.keys import existing_output_keys, pair_output_key
from infra.model_store import redact_model_spec
from infra.storage import StorageTarget, is_transient
from infra.tables import read_table, write_table
from infra.viz import public_link, viz_uri, write_png
from pairx_core import ENGINE_VERSION, ExplainConfig, PairXError, explain_indexed
from pairx_core.metrics import plausibility
from pairx_core.render import DISPLAY_MAX_SIDE, fit_display, render

from .runtime import get_model


def _box_list(box: tuple[float, float, float, float] | None) -> list[float] | None:
    return None if box is None else [float(v) for v in box]


#: concurrent image reads per batch (Pillow decodes and fsspec reads release the GIL)
DECODE_THREADS = 8


def _load_images(keys: Sequence[tuple], settings: "RunSettings", target_size=None) -> tuple[dict, set, list[dict]]:
    """Read and decode ``(uri, box, theta)`` keys in threads.

    Returns (images by key, keys that failed as bad input, their ``errors`` rows). A transient
    storage error is re-raised after the other reads finish, so the Prefect task retries it.
    """
    def load(key):
        uri, box, theta = key
        return load_image(uri, box=box, theta=theta, min_side=settings.min_image_side,
                          storage_options=settings.storage_options, target_size=target_size)

    images: dict[tuple, LoadedImage] = {}
    failed: set[tuple] = set()
    errors: list[dict] = []
    transient: BaseException | None = None
    if not keys:
        return images, failed, errors
    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, len(keys))) as pool:
        futures = [pool.submit(load, key) for key in keys]
    for key, future in zip(keys, futures):
        error = future.exception()
        if error is None:
            images[key] = future.result()
        elif not isinstance(error, PairXError) and is_transient(error):
            transient = transient or error
        else:  # bad input: record, never retry
            failed.add(key)
            errors.append(error_row(key[0], "load", error, settings.run_id))
    if transient is not None:
        raise transient
    return images, failed, errors


@dataclass(frozen=True)
class RunSettings:
    """Everything a batch needs besides its pairs (small, picklable)."""

    out: str
    model: str
    layers: tuple[str, ...]
    run_id: str
    k_lines: int = 20
    k_colors: int = 10
    device: str | None = None
    storage_options: Mapping[str, Any] | None = None
    render: bool = True
    memory_budget: int | None = None
    #: base URL under which OUT is published; ``viz_uri`` columns then hold URLs under it
    public_url: str | None = None
    #: long side of each photo in the PAIR-X picture (the chip's own resolution, capped)
    display_max_side: int = DISPLAY_MAX_SIDE
    #: images whose shorter side is below this many pixels are errors, not candidates
    min_image_side: int = DEFAULT_MIN_SIDE


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "engine": 0.0, "render": 0.0, "write": 0.0})
    irm: dict[str, float | None] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    worker: str = ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def explain_pairs_batch(items: Sequence[PairItem], settings: RunSettings) -> BatchSummary:
    """Explain ``items`` with one engine call; write PNGs and one file per table.

    Bad input (undecodable images, missing files) becomes ``errors`` rows and never raises;
    transient storage errors raise (the Prefect task retries them).
    """
    summary = BatchSummary(worker=_worker_name())
    commit_id = uuid.uuid4().hex[:16]  # this attempt's writes; the pairs rows commit them
    loaded_model = get_model(settings.model, settings.device, settings.storage_options)
    model_id = loaded_model.model_id
    storage = StorageTarget.from_url(settings.out, settings.storage_options)
    errors: list[dict] = []

    # --- decode the batch's unique images (one read per image)
    started = time.perf_counter()
    wanted = list(dict.fromkeys(
        key for item in items
        for key in ((item.image_0, item.box_0, item.theta_0), (item.image_1, item.box_1, item.theta_1))))
    images, failed_images, load_errors = _load_images(wanted, settings, loaded_model.preprocessing.size)
    errors.extend(load_errors)
    summary.seconds["decode"] += time.perf_counter() - started

    # --- skip what exists, collect what to compute
    existing = existing_output_keys(settings.out, model_id, settings.storage_options)
    prep = loaded_model.preprocessing
    extra = {"prep": prep.fingerprint()}
    if settings.render:  # the picture is part of the output: its layout version and size are too
        extra["picture"] = f"{PICTURE_VERSION}-{settings.display_max_side}"
    model_spec = redact_model_spec(settings.model)
    todo: list[tuple[PairItem, tuple, tuple, dict[str, str]]] = []
    for item in items:
        key_0 = (item.image_0, item.box_0, item.theta_0)
        key_1 = (item.image_1, item.box_1, item.theta_1)
        if key_0 in failed_images or key_1 in failed_images:
            summary.failed += 1
            errors.append({"item": item.pair_id, "stage": "explain", "error_type": "InputImageError",
                           "message": "an image of this pair could not be loaded (see its own row)",
                           "content_hash": None, "run_id": settings.run_id, "created_at": _now()})
            continue
        geometry = {**extra, "box_0": item.box_0, "box_1": item.box_1, "theta_0": item.theta_0, "theta_1": item.theta_1}
        keys = {
            layer: pair_output_key(images[key_0].content_hash, images[key_1].content_hash, model_id, layer,
                                   settings.k_lines, settings.k_colors, ENGINE_VERSION, geometry)
            for layer in settings.layers
        }
        if all(k in existing for k in keys.values()):
            summary.skipped += 1
            continue
        todo.append((item, key_0, key_1, keys))

    pair_rows: list[dict] = []
    match_rows: list[dict] = []
    image_rows: list[dict] = []
    pictures: list[str] = []
    if todo:
        started = time.perf_counter()
        order = list(dict.fromkeys(k for _, k0, k1, _ in todo for k in (k0, k1)))
        position = {key: i for i, key in enumerate(order)}
        tensors = torch.stack([prep.to_tensor(images[key].image) for key in order])
        if loaded_model.device.type == "cuda":
            tensors = tensors.pin_memory()  # the engine copies with non_blocking=True
        index = np.array([[position[k0], position[k1]] for _, k0, k1, _ in todo], dtype=np.int64)
        config = ExplainConfig(k_lines=settings.k_lines, k_colors=settings.k_colors, memory_budget=settings.memory_budget)
        try:
            with loaded_model.lock:
                results = explain_indexed(loaded_model.model, tensors, index, list(settings.layers), config,
                                          device=loaded_model.device)
        except PairXError as error:
            for item, *_ in todo:
                errors.append(error_row(item.pair_id, "explain", error, settings.run_id))
            summary.failed += len(todo)
            results = []
        summary.seconds["engine"] += time.perf_counter() - started

        displays: dict[tuple, np.ndarray] = {}
        for (item, key_0, key_1, keys), result in zip(todo, results):
            for key in (key_0, key_1):
                if key not in displays and settings.render:
                    displays[key] = fit_display(images[key].image, settings.display_max_side)
            for layer_index, layer_name in enumerate(settings.layers):
                layer = result.layers[layer_name]
                metrics = plausibility(layer)
                uri = None
                if settings.render:
                    started = time.perf_counter()
                    picture = render(layer, displays[key_0], displays[key_1], similarity=result.similarity,
                                     irm=metrics.irm, label_0=_side_label("upload", item.image_0),
                                     label_1=_side_label("candidate", item.image_1, item.individual_1))
                    written = viz_uri(settings.out, model_id, item.pair_id, layer_name, settings.storage_options,
                                      commit_id=commit_id)
                    pictures.append(write_png(storage, written, picture))
                    uri = public_link(settings.out, written, settings.public_url, settings.storage_options)
                    summary.seconds["render"] += time.perf_counter() - started
                pair_rows.append({
                    "pair_id": item.pair_id, "image_0": item.image_0, "image_1": item.image_1, "layer": layer_name,
                    "similarity": result.similarity, "n_matches": metrics.n_matches,
                    "residual_px": metrics.residual_px,
                    "inliers": metrics.inliers, "irm": metrics.irm, "match_coverage": metrics.match_coverage,
                    "relevance_share": metrics.relevance_share, "match_share": metrics.match_share,
                    "viz_uri": uri, "box_0": _box_list(item.box_0), "box_1": _box_list(item.box_1),
                    "theta_0": item.theta_0, "theta_1": item.theta_1, "model_spec": model_spec,
                    "run_id": settings.run_id, "output_key": keys[layer_name], "commit_id": commit_id,
                })
                top = layer.matches.head(settings.k_lines)
                xy_0 = images[key_0].to_original(top[["x_0", "y_0"]].to_numpy(), layer.input_size)
                xy_1 = images[key_1].to_original(top[["x_1", "y_1"]].to_numpy(), layer.input_size)
                for j, row in enumerate(top.itertuples(index=False)):
                    match_rows.append({
                        "pair_id": item.pair_id, "layer": layer_name, "rank": int(row.rank),
                        "x_0": float(xy_0[j, 0]), "y_0": float(xy_0[j, 1]),
                        "x_1": float(xy_1[j, 0]), "y_1": float(xy_1[j, 1]),
                        "distance": float(row.distance), "relevance": float(row.relevance),
                        "output_key": keys[layer_name], "commit_id": commit_id,
                    })
                if layer_index == 0:
                    summary.irm[item.pair_id] = metrics.irm
                    summary.similarity[item.pair_id] = result.similarity
            summary.done += 1
        image_rows = image_rows_to_record([images[key] for key in order], settings.out, model_id, settings.run_id,
                                          settings.storage_options)

    started = time.perf_counter()
    commit_batch(settings, model_id, {"matches": match_rows, "images": image_rows, "errors": errors},
                 pair_rows, pictures)
    summary.seconds["write"] += time.perf_counter() - started
    return summary


def commit_batch(settings: RunSettings, model_id: str, before: Mapping[str, list[dict]], pair_rows: list[dict],
                 pictures: Sequence[str]) -> None:
    """Write a batch's tables so that its results become visible together or not at all.

    One file per table; ``pairs`` last: its rows are the commit record (reruns skip by their
    output keys, readers join matches on ``output_key`` and ``commit_id``). If a write fails, the
    files and pictures already written for this batch are removed (best effort) before the error
    propagates, so that a retry adds nothing twice; what a killed process leaves behind is never
    joined to a pairs row and ``pairx gc`` removes it.
    """
    written: list[str] = list(pictures)
    try:
        for name, rows in before.items():
            if rows:
                written.append(write_table(settings.out, name, rows, model_id, settings.run_id,
                                           settings.storage_options))
        if pair_rows:
            write_table(settings.out, "pairs", pair_rows, model_id, settings.run_id, settings.storage_options)
    except BaseException:
        storage = StorageTarget.from_url(settings.out, settings.storage_options)
        for url in written:
            try:
                storage.delete(url)
            except Exception:  # noqa: BLE001 - left for `pairx gc`
                pass
        raise


#: version of the picture layout (part of the output key when pictures are rendered)
PICTURE_VERSION = "p2"


def _side_label(role: str, uri: str, individual: str | None = None) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return f"{role}: {individual} ({name})" if individual else f"{role}: {name}"


def recorded_image_hashes(out: str, model_id: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Image contents already in the ``images`` table for ``model_id``."""
    frame = read_table(out, "images", model_id=model_id, columns=["content_hash"], storage_options=storage_options)
    return set(frame["content_hash"])


def image_rows_to_record(loaded: Sequence[LoadedImage], out: str, model_id: str, run_id: str,
                         storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """``images`` rows for the contents not yet recorded for this model: one row per (content, model).

    Concurrent writers (two batches of one run seeing the same new image) can still both record
    it; ``infra/views.sql``'s ``images`` view keeps the first row per (model_id, content_hash).
    """
    known = recorded_image_hashes(out, model_id, storage_options)
    now, rows = _now(), []
    for image in loaded:
        if image.content_hash in known:
            continue
        known.add(image.content_hash)
        rows.append({"image_uri": image.uri, "content_hash": image.content_hash, "width": image.original_size[0],
                     "height": image.original_size[1], "embedded_at": now, "run_id": run_id})
    return rows


def error_row(item: str, stage: str, error: BaseException, run_id: str) -> dict:
    """An ``errors`` row; ``content_hash`` is set when the error is about the file's content itself."""
    return {"item": item, "stage": stage, "error_type": type(error).__name__, "message": str(error)[:2000],
            "content_hash": getattr(error, "content_hash", None), "run_id": run_id, "created_at": _now()}


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return "local"


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient I/O errors, never a ``PairXError``."""
    try:
        state.result()
    except PairXError:
        return False
    except Exception as error:
        return is_transient(error)
    return False


@task(name="explain_batch", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      persist_result=False, cache_policy=NO_CACHE)
def explain_batch_task(items: list[PairItem], settings: RunSettings) -> BatchSummary:
    """Prefect task: explain one batch of pairs (see :func:`explain_pairs_batch`)."""
    return explain_pairs_batch(items, settings)
