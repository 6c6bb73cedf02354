"""Does PAIR-X look more plausible for true matches than for false ones at equal similarity?

Synthetic individuals (known identities and geometry), pairs of photos of the same individual
(true) and, for every photo, its most similar photos of other individuals (false, the
confusable candidates retrieval produces), explained with the engine. Pairs are binned by the
model's similarity (quantiles over the range where both classes occur); within each bin, the AUC of each plausibility
metric for telling true from false pairs (0.5 = no information). Also reports PAIR-X's
ground-truth match accuracy (top-10 matches within one cell of the true position) against random
cell pairs. Prints a table and JSON lines; writes a PNG plot.

    python bench/plausibility.py --model demo --individuals 150 --out plausibility.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("irm", "match_coverage", "relevance_share", "inliers")


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def hard_pairs(model, images, owner: np.ndarray, false_per_true: int) -> tuple[list, list]:
    """All same-individual photo pairs (true), and for every photo its ``false_per_true`` most
    similar photos of other individuals (false): the confusable candidates a retrieval step
    would actually hand to a reviewer, so both classes meet at the same similarities."""
    import torch

    from pairx_core.retrieval import top_k

    with torch.no_grad():
        embeddings = model(images).numpy()
    pairs, truth, seen = [], [], set()
    for a in range(len(owner)):
        for b in range(a + 1, len(owner)):
            if owner[a] == owner[b]:
                pairs.append((a, b))
                truth.append(True)
        others = np.flatnonzero(owner != owner[a])
        nearest, _ = top_k(embeddings[a:a + 1], embeddings[others], false_per_true)
        for b in others[nearest[0]]:
            key = (min(a, b), max(a, b))
            if key not in seen:
                seen.add(key)
                pairs.append((a, int(b)))
                truth.append(False)
    return pairs, truth


def ground_truth_scores(explanation, photo_0, photo_1, size, seed: int, k: int = 10) -> dict:
    """Share of the top-``k`` matches within one cell of the truth, and that of random cell pairs."""
    from pairx_core.geometry import cell_size
    from pairx_core.synthetic import true_mapping
    from pairx_core.synthetic.ground_truth import match_accuracy, random_baseline

    mapping = true_mapping(photo_0, photo_1)
    grid = explanation.feature_shape[1:]
    top = explanation.matches.head(k)
    return {"match_accuracy": match_accuracy(top[["x_0", "y_0"]].to_numpy(), top[["x_1", "y_1"]].to_numpy(),
                                             mapping, cell_size(grid, size), image_size=size),
            "random_accuracy": random_baseline(grid, size, mapping, k, seed=seed, n_trials=200)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--layer", default=None, help="default: the demo model's recommended layer")
    parser.add_argument("--individuals", type=int, default=150)
    parser.add_argument("--photos", type=int, default=3, help="photos per individual")
    parser.add_argument("--false-per-true", type=int, default=2,
                        help="false pairs per photo: its most similar photos of OTHER individuals")
    parser.add_argument("--bins", type=int, default=3)
    parser.add_argument("--k-colors", type=int, default=0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default="plausibility.png")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch

    torch.set_flush_denormal(True)
    from pairx_core import ExplainConfig, explain_indexed
    from pairx_core.metrics import plausibility
    from pairx_core.models import WEIGHTS_DIR, load_model
    from pairx_core.synthetic import make_individuals, render_photo

    model, prep = load_model(args.model)
    layer = args.layer or json.loads((WEIGHTS_DIR / "demo.json").read_text()).get("layer", "backbone.blocks.3")
    size = prep.size
    individuals = make_individuals(args.individuals, seed=10_000 + args.seed)  # not the training identities
    photos = [[render_photo(ind, seed=args.seed * 1000 + i * 10 + j, size=size) for j in range(args.photos)]
              for i, ind in enumerate(individuals)]
    images = torch.stack([prep.to_tensor(p.image) for group in photos for p in group])
    owner = np.repeat(np.arange(len(individuals)), args.photos)
    pairs, truth = hard_pairs(model, images, owner, args.false_per_true)
    started = time.perf_counter()
    results = explain_indexed(model, images, np.array(pairs), [layer], ExplainConfig(k_colors=args.k_colors))
    seconds = time.perf_counter() - started
    rows = []
    for (a, b), is_true, result in zip(pairs, truth, results):
        explanation = result.layers[layer]
        metrics = plausibility(explanation).as_dict()
        row = {"true": is_true, "similarity": result.similarity, **metrics}
        if is_true:
            row.update(ground_truth_scores(explanation, photos[a // args.photos][a % args.photos],
                                           photos[b // args.photos][b % args.photos], size, seed=a))
        rows.append(row)

    similarity = np.array([r["similarity"] for r in rows])
    labels = np.array([r["true"] for r in rows])
    overlap = (similarity >= max(similarity[labels].min(), similarity[~labels].min())) & (
        similarity <= min(similarity[labels].max(), similarity[~labels].max()))
    edges = np.quantile(similarity[overlap], np.linspace(0, 1, args.bins + 1))
    table = []
    for b in range(args.bins):
        low, high = edges[b], edges[b + 1]
        inside = overlap & (similarity >= low) & (similarity <= high if b == args.bins - 1 else similarity < high)
        entry = {"bin": b, "similarity": [round(float(low), 3), round(float(high), 3)],
                 "n_true": int((inside & labels).sum()), "n_false": int((inside & ~labels).sum())}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows], dtype=float)
            entry[f"auc_{metric}"] = round(auc(values[inside & labels], values[inside & ~labels]), 3)
        table.append(entry)
        print(json.dumps(entry))
    accuracy = np.nanmean([r["match_accuracy"] for r in rows if r["true"]])
    baseline = np.nanmean([r["random_accuracy"] for r in rows if r["true"]])
    overall = {"model": args.model, "layer": layer, "pairs": len(rows), "seconds": round(seconds, 1),
               "match_accuracy_top10": round(float(accuracy), 3), "random_baseline": round(float(baseline), 3),
               **{f"auc_{m}_all": round(auc(np.array([r[m] for r in rows if r["true"]], float),
                                            np.array([r[m] for r in rows if not r["true"]], float)), 3)
                  for m in METRICS}}
    print(json.dumps(overall))
    print("\nbin  similarity        n_true n_false " + " ".join(f"{m:>16}" for m in METRICS), file=sys.stderr)
    for entry in table:
        print(f"{entry['bin']:>3}  {entry['similarity'][0]:6.3f}..{entry['similarity'][1]:6.3f}  {entry['n_true']:6d} "
              f"{entry['n_false']:7d} " + " ".join(f"{entry['auc_' + m]:16.3f}" for m in METRICS), file=sys.stderr)
    plot(table, args.out)


def plot(table: list[dict], path: str) -> None:
    """Grouped bars of AUC per similarity bin and metric, with the 0.5 line (Pillow only)."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    width, height, margin = 120 + 140 * len(table), 320, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y = lambda v: height - margin - v * (height - 2 * margin)  # noqa: E731
    draw.line([(margin, y(0)), (width - 10, y(0))], fill="black")
    draw.line([(margin, y(0.5)), (width - 10, y(0.5))], fill=(150, 150, 150))
    draw.text((4, y(1.0) - 6), "AUC 1", fill="black")
    draw.text((4, y(0.5) - 6), "0.5", fill="black")
    for b, entry in enumerate(table):
        x0 = margin + 20 + 140 * b
        for m, metric in enumerate(METRICS):
            value = entry[f"auc_{metric}"]
            if np.isfinite(value):
                draw.rectangle([x0 + 24 * m, y(value), x0 + 24 * m + 20, y(0)], fill=colours[m])
        similarity = f"sim {entry['similarity'][0]:.2f}-{entry['similarity'][1]:.2f}"
        draw.text((x0, height - margin + 6), similarity, fill="black")
    for m, metric in enumerate(METRICS):
        draw.rectangle([width - 150, 10 + 16 * m, width - 140, 20 + 16 * m], fill=colours[m])
        draw.text((width - 135, 9 + 16 * m), metric, fill="black")
    image.save(path)


if __name__ == "__main__":
    main()
