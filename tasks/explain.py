"""Explain a batch of pairs: read images, call ``pairx_core``, write pictures and tables.

``explain_pairs_batch`` is a plain function (tests and benchmarks call it without Prefect);
``explain_batch_task`` is its Prefect task. The steps it wires live elsewhere: skip planning in
``infra.keys.plan_pairs``, the engine in ``pairx_core``, table rows (matches in original photo
coordinates) in ``infra.records``. Only small summaries travel back through the scheduler.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.compute_thread import on_compute_thread
from infra.decoded_photos import load_photo
from infra.images import DEFAULT_MIN_SIDE, LoadedImage, decode_need
from infra.inputs import ImageKey, PairItem, derive_pair_id, parse_angle, parse_box  # noqa: F401 - re-exported
from infra.keys import OutputSettings, PlannedPair, existing_output_keys, plan_pairs
from infra.model_runtime import LoadedModel, get_model
from infra.model_store import redact_model_spec
from infra.records import RowContext, error_row, explanation_rows, new_image_rows, unloadable_pair_row
from infra.storage import StorageTarget, is_transient, retry_transient
from infra.tables import write_table
from infra.viz import PICTURE_VERSION, public_link, viz_uri, write_png
from pairx_core import ENGINE_VERSION, ExplainConfig, PairXError, explain_indexed
from pairx_core.metrics import plausibility
from pairx_core.render import DISPLAY_MAX_SIDE, fit_display, render
from pairx_core.results import PairExplanation

#: concurrent image reads per batch (Pillow decodes and fsspec reads release the GIL)
DECODE_THREADS = 8


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
    #: draw and write an engine batch's pictures in a background thread while the next engine
    #: batch computes (where the memory plan splits a task's pairs into several batches)
    render_in_background: bool = True


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "engine": 0.0, "render": 0.0, "write": 0.0})
    irm: dict[str, float | None] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    worker: str = ""


def _load_images(keys: Sequence[ImageKey], settings: RunSettings, target_size=None) -> tuple[dict, set, list[dict]]:
    """Read and decode ``(uri, box, theta)`` keys in threads, one decode per photo (shared with the
    run's other consumers in this process: :func:`infra.decoded_photos.load_photo`).

    Returns (images by key, keys that failed as bad input, their ``errors`` rows). A transient
    storage error is re-raised after the other reads finish, so the Prefect task retries it.
    """
    chips_per_photo: dict[str, list[tuple]] = {}
    for uri, box, theta in keys:
        chips_per_photo.setdefault(uri, []).append((box, theta))
    need = decode_need(target_size)

    def load(uri):
        return load_photo(uri, chips_per_photo[uri], need, storage_options=settings.storage_options,
                          run_id=settings.run_id)

    def cut(key, photo):
        _, box, theta = key
        return photo.result().chip(box, theta, settings.min_image_side)

    images: dict[ImageKey, LoadedImage] = {}
    failed: set[ImageKey] = set()
    errors: list[dict] = []
    transient: BaseException | None = None
    if not keys:
        return images, failed, errors
    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, len(chips_per_photo))) as pool:
        photos = {uri: pool.submit(load, uri) for uri in chips_per_photo}
        futures = [pool.submit(cut, key, photos[key[0]]) for key in keys]
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


def _image_keys(items: Sequence[PairItem]) -> list[ImageKey]:
    """The distinct image decodes of ``items``, in order of first use."""
    return list(dict.fromkeys(key for item in items for key in item.image_keys))


@dataclass
class _Outputs:
    """What one batch writes: table rows and the pictures already written."""

    tables: dict[str, list[dict]] = field(default_factory=lambda: {"matches": [], "images": [], "errors": []})
    pairs: list[dict] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)


def explain_pairs_batch(items: Sequence[PairItem], settings: RunSettings) -> BatchSummary:
    """Explain ``items`` with one engine call; write PNGs and one file per table.

    Bad input (undecodable images, missing files) becomes ``errors`` rows and never raises;
    transient storage errors raise (the Prefect task retries them).
    """
    summary = BatchSummary(worker=_worker_name())
    model = get_model(settings.model, settings.device, settings.storage_options)
    outputs = _Outputs()
    started = time.perf_counter()
    images, _, outputs.tables["errors"] = _load_images(_image_keys(items), settings, model.preprocessing.size)
    summary.seconds["decode"] += time.perf_counter() - started
    existing = existing_output_keys(settings.out, model.model_id, settings.storage_options)
    hashes = {key: image.content_hash for key, image in images.items()}
    plan = plan_pairs(items, hashes, existing, _output_settings(settings, model))
    summary.skipped, summary.failed = len(plan.skipped), len(plan.unloadable)
    outputs.tables["errors"] += [unloadable_pair_row(item.pair_id, settings.run_id) for item in plan.unloadable]
    if plan.todo:
        _explain_planned(plan.todo, images, model, settings, summary, outputs)
    started = time.perf_counter()
    commit_batch(settings, model.model_id, outputs.tables, outputs.pairs, outputs.pictures)
    summary.seconds["write"] += time.perf_counter() - started
    return summary


def _output_settings(settings: RunSettings, model: LoadedModel) -> OutputSettings:
    extra = {"prep": model.preprocessing.fingerprint()}
    if settings.render:  # the picture is part of the output: its layout version and size are too
        extra["picture"] = f"{PICTURE_VERSION}-{settings.display_max_side}"
    return OutputSettings(model.model_id, tuple(settings.layers), settings.k_lines, settings.k_colors,
                          ENGINE_VERSION, extra)


def _run_engine(todo: Sequence[PlannedPair], images: Mapping[ImageKey, LoadedImage], model: LoadedModel,
                settings: RunSettings, errors: list[dict],
                on_batch: Callable[[list[PairExplanation]], None] | None = None) -> list[PairExplanation] | None:
    """One ``explain_indexed`` call for all of ``todo`` (``result.index``: position in ``todo``);
    each engine batch's results go to ``on_batch`` as soon as they are done. A ``PairXError``
    fails the pairs not delivered yet (``errors`` rows, None)."""
    order = _image_keys([p.item for p in todo])
    position = {key: i for i, key in enumerate(order)}
    index = np.array([[position[k] for k in p.item.image_keys] for p in todo], dtype=np.int64)
    config = ExplainConfig(k_lines=settings.k_lines, k_colors=settings.k_colors, memory_budget=settings.memory_budget)
    delivered: set[int] = set()

    def deliver(batch: list[PairExplanation]) -> None:
        delivered.update(result.index for result in batch)
        if on_batch is not None:
            on_batch(batch)

    def compute() -> list[PairExplanation]:
        tensors = torch.stack([model.preprocessing.to_tensor(images[key].image) for key in order])
        if model.device.type == "cuda":
            tensors = tensors.pin_memory()  # the engine copies with non_blocking=True
        return explain_indexed(model.model, tensors, index, list(settings.layers), config, device=model.device,
                               on_batch=deliver)

    try:
        return on_compute_thread(compute)
    except PairXError as error:
        errors.extend(error_row(p.item.pair_id, "explain", error, settings.run_id)
                      for i, p in enumerate(todo) if i not in delivered)
        return None


class _RenderQueue:
    """Runs the drawing of one engine batch's pictures at a time, in a background thread or inline.

    ``submit`` first waits for the batch before (at most one batch of renders in flight);
    ``close`` waits for the last one. An exception of a job is re-raised by the next ``submit``
    or by ``close``.
    """

    def __init__(self, background: bool):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairx-render") if background else None
        self._pending: Future | None = None
        #: seconds the task spent waiting for renders (inline: all of their time)
        self.waited = 0.0

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            started = time.perf_counter()
            job()
            self.waited += time.perf_counter() - started
        else:
            self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            started = time.perf_counter()
            try:
                pending.result()
            finally:
                self.waited += time.perf_counter() - started

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _explain_planned(todo: Sequence[PlannedPair], images: Mapping[ImageKey, LoadedImage], model: LoadedModel,
                     settings: RunSettings, summary: BatchSummary, outputs: _Outputs) -> None:
    """Engine, metrics, pictures and rows of the pairs to compute, into ``outputs``.

    Pictures of an engine batch are drawn while the next one computes (``_RenderQueue``); a
    picture that fails to draw or write gives its pair an ``errors`` row (stage ``render``) and
    no ``pairs`` row, so a rerun computes it again; a transient storage error is re-raised after
    every render has finished (the Prefect task retries the batch).
    """
    context = RowContext(settings.run_id, uuid.uuid4().hex[:16], redact_model_spec(settings.model), settings.k_lines)
    pictures = _Pictures(settings, model.model_id, context.commit_id)
    renders = _RenderQueue(settings.render and settings.render_in_background)
    results: dict[int, PairExplanation] = {}  # by position in todo
    metrics: dict[int, dict] = {}
    uris: dict[int, dict[str, str | None]] = {}
    render_errors: dict[int, BaseException] = {}
    transient: list[BaseException] = []

    def draw(batch: list[PairExplanation]) -> None:  # runs in the render thread
        for result in batch:
            item = todo[result.index].item
            metrics[result.index] = {layer: plausibility(result.layers[layer]) for layer in settings.layers}
            if not settings.render:
                continue
            started = time.perf_counter()
            try:
                sides = tuple(images[key] for key in item.image_keys)
                uris[result.index] = pictures.draw(item, result, sides, metrics[result.index])
            except Exception as error:  # noqa: BLE001 - recorded per pair, transient ones re-raised
                if not isinstance(error, PairXError) and is_transient(error):
                    transient.append(error)
                else:
                    render_errors[result.index] = error
            finally:
                summary.seconds["render_busy"] = summary.seconds.get("render_busy", 0.0) + (
                    time.perf_counter() - started)

    def on_batch(batch: list[PairExplanation]) -> None:
        results.update((result.index, result) for result in batch)
        renders.submit(lambda: draw(batch))

    started = time.perf_counter()
    try:
        finished = _run_engine(todo, images, model, settings, outputs.tables["errors"], on_batch)
        summary.seconds["engine"] += time.perf_counter() - started - renders.waited
    finally:
        renders.close()
        outputs.pictures += pictures.written
    summary.seconds["render"] += renders.waited
    if transient:
        raise transient[0]
    if finished is None:
        summary.failed += len(todo) - len(results)
    for position in sorted(results):
        item, result = todo[position].item, results[position]
        if position in render_errors:
            outputs.tables["errors"].append(error_row(item.pair_id, "render", render_errors[position], settings.run_id))
            summary.failed += 1
            continue
        sides = tuple(images[key] for key in item.image_keys)
        pair_rows, match_rows = explanation_rows(item, result, sides, metrics[position], todo[position].output_keys,
                                                 uris.get(position, {}), context)
        outputs.pairs += pair_rows
        outputs.tables["matches"] += match_rows
        summary.irm[item.pair_id] = metrics[position][settings.layers[0]].irm
        summary.similarity[item.pair_id] = result.similarity
        summary.done += 1
    used = [images[key] for key in _image_keys([p.item for p in todo])]
    outputs.tables["images"] = new_image_rows(used, settings.out, model.model_id, settings.run_id,
                                              settings.storage_options)


class _Pictures:
    """Draws and writes a batch's PAIR-X pictures; remembers what it wrote (for a rollback)."""

    def __init__(self, settings: RunSettings, model_id: str, commit_id: str):
        self.settings, self.model_id, self.commit_id = settings, model_id, commit_id
        self.storage = StorageTarget.from_url(settings.out, settings.storage_options)
        self.displays: dict[int, np.ndarray] = {}  # by id() of the LoadedImage
        self.written: list[str] = []

    def _display(self, image: LoadedImage) -> np.ndarray:
        key = id(image)
        if key not in self.displays:
            self.displays[key] = fit_display(image.image, self.settings.display_max_side)
        return self.displays[key]

    def draw(self, item: PairItem, result: PairExplanation, sides: tuple[LoadedImage, LoadedImage],
             metrics) -> dict[str, str | None]:
        """Per layer, the public link of the picture written for ``item``."""
        s, uris = self.settings, {}
        for layer in s.layers:
            picture = render(result.layers[layer], self._display(sides[0]), self._display(sides[1]),
                             similarity=result.similarity, irm=metrics[layer].irm,
                             label_0=_side_label("upload", item.image_0),
                             label_1=_side_label("candidate", item.image_1, item.individual_1))
            written = viz_uri(s.out, self.model_id, item.pair_id, layer, s.storage_options, commit_id=self.commit_id)
            self.written.append(write_png(self.storage, written, picture))
            uris[layer] = public_link(s.out, written, s.public_url, s.storage_options)
        return uris


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


def _side_label(role: str, uri: str, individual: str | None = None) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return f"{role}: {individual} ({name})" if individual else f"{role}: {name}"


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001 - not inside a Dask worker
        return "local"


@task(name="explain_batch", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      persist_result=False, cache_policy=NO_CACHE)
def explain_batch_task(items: list[PairItem], settings: RunSettings) -> BatchSummary:
    """Prefect task: explain one batch of pairs (see :func:`explain_pairs_batch`)."""
    return explain_pairs_batch(items, settings)
