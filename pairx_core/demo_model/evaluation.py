"""Held-out evaluation of the demo model: top-1 re-ID accuracy against a random-init copy of the
same architecture, and a check that PAIR-X gives finite relevance on it."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..models import MiewIdNet, seeded
from ..preprocess import Preprocessing
from ..retrieval import top_k
from ..synthetic import make_individuals, render_photo
from .config import EVAL_DIFFICULTY, EVAL_SEED, LAYER


def photo_seed(*parts: int) -> int:
    """A photo seed derived from ``parts`` (individual seed, index, photo number, purpose tag)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def evaluation_photos(n_identities: int, queries: int, size: tuple[int, int], seed: int = EVAL_SEED,
                      difficulty: float = EVAL_DIFFICULTY):
    """Held-out photos: per identity one gallery photo and ``queries`` query photos.

    Returns ``(gallery images, query images, query labels)``; gallery ``i`` is identity ``i``.
    """
    gallery, query, labels = [], [], []
    for i, individual in enumerate(make_individuals(n_identities, seed)):
        for j in range(1 + queries):
            photo = render_photo(individual, photo_seed(seed, i, j, 0xE7), size, difficulty=difficulty)
            if j == 0:
                gallery.append(photo.image)
            else:
                query.append(photo.image)
                labels.append(i)
    return gallery, query, np.asarray(labels)


@torch.no_grad()
def top1_accuracy(model: nn.Module, preprocessing: Preprocessing, gallery, query, labels) -> float:
    """Top-1 re-ID accuracy: each query's nearest gallery photo by cosine similarity."""
    was_training = model.training
    model.eval()
    try:
        g = model(preprocessing.batch(gallery)).numpy()
        q = model(preprocessing.batch(query)).numpy()
    finally:
        model.train(was_training)
    predicted = top_k(q, g, 1)[0][:, 0]
    return float((predicted == labels).mean())


def random_model(arch: str, seed: int = 0) -> MiewIdNet:
    """The same architecture with random initialisation (the baseline), eval mode."""
    return seeded(lambda: MiewIdNet(arch), seed).eval()


def evaluate(model: nn.Module, preprocessing: Preprocessing, arch: str, n_identities: int = 50,
             queries: int = 2, seed: int = EVAL_SEED, difficulty: float = EVAL_DIFFICULTY) -> dict[str, float]:
    """Top-1 accuracy of ``model`` and of a random-init copy on held-out identities."""
    gallery, query, labels = evaluation_photos(n_identities, queries, preprocessing.size, seed, difficulty)
    return {
        "trained_top1": top1_accuracy(model, preprocessing, gallery, query, labels),
        "random_top1": top1_accuracy(random_model(arch), preprocessing, gallery, query, labels),
        "chance_top1": 1.0 / n_identities,
    }


def check_pairx(model: nn.Module, preprocessing: Preprocessing, layer: str = LAYER) -> dict:
    """Run PAIR-X on two held-out photos of one individual; raise unless relevance is finite."""
    from .. import explain
    from ..canonizers import select_canonizers

    select_canonizers(model)
    individual = make_individuals(1, EVAL_SEED + 1)[0]
    photos = [render_photo(individual, s, preprocessing.size, difficulty=EVAL_DIFFICULTY).image for s in (1, 2)]
    x = preprocessing.batch(photos)
    started = time.perf_counter()
    result = explain(model, x[:1], x[1:], layers=[layer], k_colors=3)[0]
    seconds = time.perf_counter() - started
    explanation = result.layers[layer]
    arrays = [explanation.relevance_0, explanation.relevance_1,
              explanation.pixel_relevance_0, explanation.pixel_relevance_1]
    if not all(np.isfinite(np.asarray(a)).all() for a in arrays):
        raise RuntimeError(f"PAIR-X gave non-finite relevance at {layer}")
    return {
        "layer": layer,
        "feature_shape": list(explanation.feature_shape),
        "matches": explanation.n_matches,
        "similarity": round(float(result.similarity), 4),
        "seconds": round(seconds, 2),
    }
