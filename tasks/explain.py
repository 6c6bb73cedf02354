"""Explain a batch of pairs: read images, call ``pairx_core``, write pictures and tables.

``explain_pairs_batch`` is a plain function (tested directly); ``explain_batch_task`` is its thin
Prefect task. Only small summaries travel back through the scheduler.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.images import LoadedImage, load_image
from infra.keys import existing_output_keys, pair_output_key
from infra.storage import StorageTarget, is_transient
from infra.tables import write_table
from infra.viz import viz_uri, write_png
from pairx_core import ENGINE_VERSION, ConfigError, ExplainConfig, PairXError, explain_indexed
from pairx_core.metrics import plausibility
from pairx_core.render import display_scale, render

from .runtime import get_model


@dataclass(frozen=True)
class PairItem:
    """One pair to explain: image URLs and optional crop boxes / rotations."""

    pair_id: str
    image_0: str
    image_1: str
    box_0: tuple[float, float, float, float] | None = None
    box_1: tuple[float, float, float, float] | None = None
    theta_0: float = 0.0
    theta_1: float = 0.0


def parse_box(value: Any) -> tuple[float, float, float, float] | None:
    """A crop box ``x, y, w, h`` from a table cell.

    Accepts null / NaN / "" (whole image), ``"x y w h"``, ``"[x, y, w, h]"`` (pairs tables) and a
    sequence (the ``pairs`` output table's list column).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        parts = json.loads(value) if value.strip().startswith("[") else value.split()
    else:
        parts = list(value)
    if len(parts) != 4:
        raise ConfigError(f"a box needs 4 numbers x y w h, got {value!r}")
    return tuple(float(p) for p in parts)


def parse_angle(value: Any) -> float:
    """A rotation in radians from a table cell; null / NaN / "" mean no rotation."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    angle = float(value)
    return 0.0 if math.isnan(angle) else angle


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
        return load_image(uri, box=box, theta=theta, storage_options=settings.storage_options, target_size=target_size)

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
            errors.append(_error_row(key[0], "load", error, settings.run_id))
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


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "engine": 0.0, "render": 0.0, "write": 0.0})
    irm: dict[str, float] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    worker: str = ""


def derive_pair_id(image_0: str, image_1: str) -> str:
    """Stable id of a pair from its image URLs (order matters)."""
    return hashlib.sha256(f"{image_0}\n{image_1}".encode()).hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def explain_pairs_batch(items: Sequence[PairItem], settings: RunSettings) -> BatchSummary:
    """Explain ``items`` with one engine call; write PNGs and one file per table.

    Bad input (undecodable images, missing files) becomes ``errors`` rows and never raises;
    transient storage errors raise (the Prefect task retries them).
    """
    summary = BatchSummary(worker=_worker_name())
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
    todo: list[tuple[PairItem, tuple, tuple, dict[str, str]]] = []
    for item in items:
        key_0 = (item.image_0, item.box_0, item.theta_0)
        key_1 = (item.image_1, item.box_1, item.theta_1)
        if key_0 in failed_images or key_1 in failed_images:
            summary.failed += 1
            errors.append({"item": item.pair_id, "stage": "explain", "error_type": "InputImageError",
                           "message": "an image of this pair could not be loaded (see its own row)",
                           "run_id": settings.run_id, "created_at": _now()})
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
                errors.append(_error_row(item.pair_id, "explain", error, settings.run_id))
            summary.failed += len(todo)
            results = []
        summary.seconds["engine"] += time.perf_counter() - started

        displays: dict[tuple, np.ndarray] = {}
        for (item, key_0, key_1, keys), result in zip(todo, results):
            for key in (key_0, key_1):
                if key not in displays and settings.render:
                    displays[key] = prep.to_display(tensors[position[key]])
            for layer_index, layer_name in enumerate(settings.layers):
                layer = result.layers[layer_name]
                metrics = plausibility(layer)
                uri = None
                if settings.render:
                    started = time.perf_counter()
                    picture = render(layer, displays[key_0], displays[key_1], similarity=result.similarity,
                                     irm=metrics.irm, scale=display_scale(layer.input_size))
                    uri = viz_uri(settings.out, model_id, item.pair_id, layer_name, settings.storage_options)
                    write_png(storage, uri, picture)
                    summary.seconds["render"] += time.perf_counter() - started
                pair_rows.append({
                    "pair_id": item.pair_id, "image_0": item.image_0, "image_1": item.image_1, "layer": layer_name,
                    "similarity": result.similarity, "n_matches": metrics.n_matches,
                    "residual_px": None if not np.isfinite(metrics.residual_px) else metrics.residual_px,
                    "inliers": metrics.inliers, "irm": metrics.irm, "match_coverage": metrics.match_coverage,
                    "relevance_share": metrics.relevance_share, "match_share": metrics.match_share,
                    "viz_uri": uri, "box_0": _box_list(item.box_0), "box_1": _box_list(item.box_1),
                    "theta_0": item.theta_0, "theta_1": item.theta_1,
                    "run_id": settings.run_id, "output_key": keys[layer_name],
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
                        "output_key": keys[layer_name],
                    })
                if layer_index == 0:
                    summary.irm[item.pair_id] = metrics.irm
                    summary.similarity[item.pair_id] = result.similarity
            summary.done += 1
        embedded_at = _now()
        for key in order:
            loaded = images[key]
            image_rows.append({"image_uri": loaded.uri, "content_hash": loaded.content_hash,
                               "width": loaded.original_size[0], "height": loaded.original_size[1],
                               "embedded_at": embedded_at})

    # --- one file per table per batch; pairs last, so a crash never records work as done
    # whose matches are missing
    started = time.perf_counter()
    for name, rows in (("matches", match_rows), ("images", image_rows), ("errors", errors), ("pairs", pair_rows)):
        if rows:
            write_table(settings.out, name, rows, model_id, settings.run_id, settings.storage_options)
    summary.seconds["write"] += time.perf_counter() - started
    return summary


def _error_row(item: str, stage: str, error: BaseException, run_id: str) -> dict:
    return {"item": item, "stage": stage, "error_type": type(error).__name__, "message": str(error)[:2000],
            "run_id": run_id, "created_at": _now()}


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
