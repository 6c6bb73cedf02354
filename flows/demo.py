"""``pairx demo``: a night of synthetic camera-trap uploads against a synthetic gallery, end to end.

Generates individuals with known geometry (``pairx_core.synthetic``), writes a gallery (one folder
per individual) and a night of camera-trap frames (0 to 3 animals each) with their detector output
into a local folder, runs the real ``nightly`` flow through the detections with the embedded
``demo`` model, then scores what it did against the ground truth (retrieval top-1 and
the share of PAIR-X's top matches that land where the true mapping says) and writes
``index.html``, readable in a browser without a server. With ``auto_decide`` (``pairx demo
--auto-decide``) the ground truth then records each upload's decision (every detection of every
frame), as a reviewer would.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from infra.storage import OutputLayout
from pairx_core.geometry import cell_size
from pairx_core.synthetic.ground_truth import match_accuracy, random_baseline
from pairx_core.synthetic import make_individuals, render_photo, true_mapping

from .config import NightlyConfig

DEMO_MODEL = "demo"
#: the reviewer name of the decisions ``pairx demo --auto-decide`` records
DEMO_REVIEWER = "demo-ground-truth"


@dataclass(frozen=True)
class DemoSettings:
    out: Path
    individuals: int = 12
    gallery_photos: int = 2
    top_k: int = 3
    #: candidates per upload judged from the activation cache before the top_k are explained; the
    #: demo judges every gallery photo up to 20 (nightly's default is 5): on the demo model stage 1
    #: costs a tenth of an explanation, and the page shows the re-ranking at work
    rerank_k: int = 20
    seed: int = 2024
    k_lines: int = 10
    k_colors: int = 5
    workers: int | None = None
    #: after the night, record the true decisions (ground truth as the reviewer)
    auto_decide: bool = False


#: ``(H, W)`` of the demo's camera-trap frames, in crops of the model's input size
FRAME_CROPS = (2.5, 3.75)
#: file the demo's detector output is written to, under ``data/``
DETECTIONS_FILE = "detections.json"


def _animal_counts(rng: np.random.Generator, n_individuals: int) -> list[int]:
    """Animals per frame (0 to 3) so that every individual appears once, with empty frames among them."""
    counts: list[int] = []
    left = n_individuals
    while left:
        count = min(int(rng.integers(0, 4)), left)
        counts.append(count)
        left -= count
    if 0 not in counts:
        counts.insert(len(counts) // 2, 0)
    return counts


def write_dataset(settings: DemoSettings, size: tuple[int, int]) -> dict:
    """Gallery ``gallery/<individual>/<n>.png``; tonight's camera-trap frames ``uploads/frame-<i>.png``
    (0 to 3 animals each, every individual once, some frames empty) and their detector output
    ``detections.json`` (one low-confidence false detection, one detector failure); truth JSON.

    The truth is keyed by gallery photo path and by ``<frame path>#detection=<j>`` (the night's
    name of a detection), with each animal's canonical -> photo (frame) transform and box.
    """
    from infra.detections import write_detector_output
    from pairx_core.synthetic.camera_trap import detector_output, render_frame

    root = settings.out / "data"
    truth = {}
    individuals = make_individuals(settings.individuals, settings.seed)
    for ind in individuals:
        folder = root / "gallery" / ind.id
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(settings.gallery_photos):
            photo = render_photo(ind, seed=settings.seed * 100 + n, size=size)
            path = folder / f"{n}.png"
            photo.image.save(path)
            truth[str(path)] = {"individual": ind.id, "transform": photo.transform.tolist()}
    (root / "uploads").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.seed)
    order = [individuals[int(k)] for k in rng.permutation(len(individuals))]
    frame_size = (round(size[0] * FRAME_CROPS[0]), round(size[1] * FRAME_CROPS[1]))
    frames, files = [], []
    for i, count in enumerate(_animal_counts(rng, len(order))):
        chosen, order = order[:count], order[count:]
        frame = render_frame(chosen, seed=settings.seed * 100 + i, size=frame_size, crop_size=size, difficulty=0.5)
        files.append(f"frame-{i:02d}.png")
        path = root / "uploads" / files[-1]
        frame.image.save(path)
        frames.append(frame)
        for j, animal in enumerate(frame.animals):
            truth[f"{path}#detection={j}"] = {"individual": animal.individual_id,
                                               "transform": animal.transform.tolist(), "box": list(animal.box)}
    write_detector_output(str(root / DETECTIONS_FILE), detector_output(frames, files, seed=settings.seed))
    (settings.out / "ground_truth.json").write_text(json.dumps(truth))
    return truth


def _detection_truth(truth: dict, query: str, detection) -> dict:
    """The truth of a candidates row's upload (a detection of a frame, or a whole photo)."""
    if detection is None or (isinstance(detection, float) and np.isnan(detection)):
        return truth.get(query, {})
    return truth.get(f"{query}#detection={int(detection)}", {})


def _truth_by_box(truth: dict) -> dict:
    """Truth entries of detections by ``(frame path, box)`` (how a pairs row names its upload)."""
    return {(name.split("#", 1)[0], tuple(float(v) for v in entry["box"])): entry
            for name, entry in truth.items() if "box" in entry}


@dataclass(frozen=True)
class PreparedDemo:
    """The demo's photos on disk, their ground truth, and the nightly config that will run them."""

    config: NightlyConfig
    truth: dict
    layer: str
    size: tuple[int, int]
    seconds: float


def prepare_demo(settings: DemoSettings) -> PreparedDemo:
    """Draw and write the photos and load the demo model into this process (no Prefect needed:
    the CLI does this while its temporary server starts)."""
    from pairx_core.specs import BUNDLED_WEIGHTS_DIR
    from infra.model_runtime import get_model

    started = time.perf_counter()
    settings.out.mkdir(parents=True, exist_ok=True)
    demo_info = json.loads((BUNDLED_WEIGHTS_DIR / "demo.json").read_text())
    layer = demo_info["layer"]
    size = tuple(demo_info["size"])
    truth = write_dataset(settings, size)
    config = NightlyConfig(uploads=str(settings.out / "data" / "uploads"),
                           gallery=str(settings.out / "data" / "gallery"),
                           out=str(settings.out / "results"), model=DEMO_MODEL, layers=[layer], top_k=settings.top_k,
                           detections=str(settings.out / "data" / DETECTIONS_FILE),
                           rerank_k=settings.rerank_k,
                           k_lines=settings.k_lines, k_colors=settings.k_colors, batch_pairs=8,
                           workers=settings.workers, device="cpu")
    get_model(DEMO_MODEL, "cpu")  # the flow's checks reuse it
    from . import nightly  # noqa: F401 - Prefect's flow machinery, imported while the server starts
    return PreparedDemo(config, truth, layer, size, time.perf_counter() - started)


def run_demo(settings: DemoSettings, prepared: PreparedDemo | None = None) -> dict:
    """Run the demo (preparing it first unless done); returns the summary printed by ``pairx demo``."""
    from infra.model_runtime import get_model

    from .nightly import nightly

    prepared = prepared or prepare_demo(settings)
    started = time.perf_counter() - prepared.seconds
    config, truth, layer, size = prepared.config, prepared.truth, prepared.layer, prepared.size
    flow_summary = nightly(config)
    loaded = get_model(DEMO_MODEL, "cpu")
    scores = score_results(config.out, truth, layer, loaded.model, size, k=10)
    decided = {"decisions": decide_from_truth(config.out, truth)} if settings.auto_decide else {}
    write_index(settings.out, config.out, truth, layer)
    return {**flow_summary, **scores, **decided, "seconds_total": round(time.perf_counter() - started, 1),
            "index_html": str(settings.out / "index.html"), "tables": OutputLayout(config.out).tables,
            "pictures": OutputLayout(config.out).viz}


def truth_requests(out: str, truth: dict, reviewer: str = DEMO_REVIEWER) -> list:
    """The decisions ground truth makes on the uploads of ``out`` not decided yet, as requests.

    An upload is a whole photo or one detection of a camera-trap frame (each decided on its own).
    Each upload's latest night: ``match`` with the candidate of the true individual (its best
    rank) when it is among the candidates, else ``match`` on the known individual, else
    ``new_individual`` named after it; an upload whose truth names no individual is ``no_match``;
    one without truth stays pending.
    """
    from infra.decisions import DecisionRequest, UploadIndex, latest_by_upload, read_decisions

    index = UploadIndex.load(out)
    decided = latest_by_upload(read_decisions(out))
    requests = []
    for upload in index.uploads():
        entry = truth.get(upload.query if upload.detection is None else f"{upload.query}#detection={upload.detection}")
        if entry is None or upload.key in decided:
            continue
        individual = entry.get("individual")
        base = {"query": upload.query, "detection_id": upload.detection_id, "reviewer": reviewer,
                "note": "pairx demo: ground truth"}
        candidate = upload.candidate(rank=None, gallery_image=None, individual=individual) if individual else None
        if individual is None:
            fields = {"decision": "no_match"}
        elif candidate is not None:
            fields = {"decision": "match", "rank": candidate["rank"], "night_run_id": upload.run_id,
                      "model_id": upload.model_id}
        elif individual in index.individuals:
            fields = {"decision": "match", "individual": individual}
        else:
            fields = {"decision": "new_individual", "individual": individual}
        requests.append(DecisionRequest.from_mapping({**base, **fields}))
    return requests


def decide_from_truth(out: str, truth: dict) -> dict[str, int]:
    """Record :func:`truth_requests` (same checks and table as ``pairx decide``), rewrite the review
    site's index so that it shows the figures; returns how many of each decision were recorded."""
    from infra.decisions import record_decisions
    from infra.report import refresh_index

    requests = truth_requests(out, truth)
    rows = record_decisions(out, requests) if requests else []
    refresh_index(out)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["decision"]] = counts.get(row["decision"], 0) + 1
    return counts


def _grid(model, layer: str, size: tuple[int, int]) -> tuple[int, int]:
    import torch

    from infra.compute_thread import on_compute_thread
    from pairx_core import embed

    _, features = on_compute_thread(embed, model, torch.zeros(1, 3, *size), [layer])
    return tuple(features[layer].shape[2:])


def score_results(out: str, truth: dict, layer: str, model, size: tuple[int, int], k: int = 10) -> dict:
    """Top-1 retrieval accuracy and ground-truth match accuracy (vs random cell pairs)."""
    from infra.tables import read_table

    candidates = read_table(out, "candidates")
    top1 = candidates[candidates["rank"] == 0]
    correct = [_detection_truth(truth, q, d).get("individual") == ind
               for q, d, ind in zip(top1["query"], top1["query_detection"], top1["individual"])]
    by_box = _truth_by_box(truth)
    matches = read_table(out, "matches")
    pairs = read_table(out, "pairs")
    grid = _grid(model, layer, size)
    cell = cell_size(grid, size)
    accuracy, baseline = [], []
    for pair in pairs.itertuples(index=False):
        box = None if pair.box_0 is None else tuple(float(v) for v in pair.box_0)
        a, b = by_box.get((pair.image_0, box)) or truth.get(pair.image_0), truth.get(pair.image_1)
        if a is None or b is None or a["individual"] != b["individual"]:
            continue
        mapping = true_mapping(np.asarray(a["transform"]), np.asarray(b["transform"]))
        mine = matches[(matches.pair_id == pair.pair_id) & (matches.layer == layer)].sort_values("rank").head(k)
        if mine.empty:
            continue
        accuracy.append(match_accuracy(mine[["x_0", "y_0"]].to_numpy(), mine[["x_1", "y_1"]].to_numpy(), mapping,
                                       cell, image_size=size))
        baseline.append(random_baseline(grid, size, mapping, k, seed=len(baseline), n_trials=200))
    return {
        "uploads": int(len(top1)),
        "top1_accuracy": float(np.mean(correct)) if correct else float("nan"),
        "true_pairs_scored": len(accuracy),
        "match_accuracy_top10": float(np.nanmean(accuracy)) if accuracy else float("nan"),
        "match_accuracy_random": float(np.nanmean(baseline)) if baseline else float("nan"),
    }


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def write_index(root: Path, out: str, truth: dict, layer: str) -> None:
    """``index.html``: each upload with its ranked candidates and their PAIR-X pictures."""
    from infra.report.data import reviewed
    from infra.tables import read_table

    candidates = read_table(out, "candidates").sort_values(["query", "query_detection", "rank"])
    candidates["query_detection"] = candidates["query_detection"].astype("Int64")
    pairs = read_table(out, "pairs")
    pictures = {r.pair_id: r.viz_uri for r in pairs.itertuples(index=False) if r.layer == layer}

    def rel(path: str) -> str:
        return html.escape(os.path.relpath(path, root))

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pairx demo</title>",
             "<style>body{font-family:sans-serif;margin:1em} .q{border-top:1px solid #ccc;padding:.5em 0}"
             " .c{display:inline-block;vertical-align:top;margin:4px;font-size:12px} img{max-width:480px}"
             " .ok{color:green} .no{color:#b00}</style></head><body>",
             "<h1>PAIR-X demo: tonight's uploads</h1>",
             f"<p>Layer <code>{html.escape(layer)}</code>. Candidates ranked by "
             "0.5 &times; similarity + 0.5 &times; IRM. Green: same individual as the upload (ground truth).</p>"]
    for (query, detection), group in candidates.groupby(["query", "query_detection"], sort=True, dropna=False):
        judged = len(group)
        group = group[reviewed(group)]  # the night's top_k, with pictures
        detection = None if detection is None or detection is pd.NA else int(detection)
        true_id = _detection_truth(truth, query, detection).get("individual", "?")
        which = "" if detection is None else f", detection {detection}"
        parts.append(f"<div class='q'><h3>{html.escape(os.path.basename(query))}{which} "
                     f"(truly {html.escape(true_id)})</h3><img src='{rel(query)}' style='width:240px'><br>")
        for row in group.itertuples(index=False):
            ok = "ok" if row.individual == true_id else "no"
            picture = row.viz_uri if isinstance(row.viz_uri, str) else pictures.get(row.pair_id)
            image = f"<img src='{rel(picture)}'>" if picture else "(no picture)"
            parts.append(f"<div class='c'><span class='{ok}'>#{row.rank + 1} {html.escape(str(row.individual))}</span>"
                         f" sim {row.similarity:.3f} IRM {_fmt(row.irm)}<br>{image}</div>")
        if judged > len(group):
            parts.append(f"<p>{judged - len(group)} more candidate(s) ranked lower: judged from cached "
                         "activations, or explained and then displaced by the re-ranking (see the candidates "
                         "table).</p>")
        parts.append("</div>")
    parts.append("</body></html>")
    (root / "index.html").write_text("\n".join(parts))
