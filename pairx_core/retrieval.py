"""Re-ranking retrieved candidates with PAIR-X plausibility: pure functions, no I/O.

A night's retrieval hands each upload its top-k gallery images by cosine similarity; after the
pairs are explained, :func:`rank_candidates` orders each upload's candidates by
:func:`rerank_score` (the ``candidates`` table's rows are built from its result by
``infra.records.candidate_rows``).

Re-rank score: ``(1 - w) * similarity + w * irm`` with ``w = RERANK_IRM_WEIGHT`` (0.5). When a
pair's IRM is undefined (fewer than 5 matches, zero relevance among them, or the pair was not
explained: ``irm`` None or NaN), its score falls back to the similarity alone.

Such a score cannot be compared with a blended one: similarity and IRM live on different scales
(on the manta photos with a random-weight model, similarities of 0.94-0.99 against IRMs of
0.0-0.12, so every pair without IRM would jump above every pair with one, the true individual
included). :func:`rank_candidates` therefore falls back for the whole upload: when any of an
upload's candidates has no IRM, all of that upload's candidates are scored by similarity alone,
i.e. kept in retrieval order. With a real re-ID model at its usual resolution (hundreds of
mutual matches per pair) this is rare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

#: weight of plausibility (IRM) against similarity in the re-ranking score
RERANK_IRM_WEIGHT = 0.5


@dataclass(frozen=True)
class Candidate:
    """One retrieved (upload, gallery image) pair, before re-ranking."""

    query: str
    gallery_image: str
    similarity: float
    pair_id: str
    individual: str | None = None


@dataclass(frozen=True)
class PairOutcome:
    """What the explanation of a candidate pair produced at the ranking layer."""

    layer: str
    irm: float | None = None
    viz_uri: str | None = None
    output_key: str | None = None


@dataclass(frozen=True)
class RankedCandidate:
    """One candidate after re-ranking: its 0-based ``rank`` within its query, the ``score`` it was
    ranked by, its ``irm`` when defined, and the explanation it was ranked with (None: none)."""

    candidate: Candidate
    rank: int
    score: float
    irm: float | None
    outcome: PairOutcome | None


def cosine_similarities(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Cosine similarities ``(Q, G)`` of embeddings ``query (Q, D)`` and ``gallery (G, D)``.

    Zero vectors get similarity 0 with everything (their norm is clamped, not divided by zero).
    """
    query = np.asarray(query, dtype=np.float64 if np.asarray(query).dtype == np.float64 else np.float32)
    gallery = np.asarray(gallery, dtype=query.dtype)
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return q @ g.T


def top_k(query: np.ndarray, gallery: np.ndarray, k: int, *,
          exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k: indices and similarities ``(Q, k')`` with ``k' = min(k, G)``, best first.

    Ties keep gallery order (stable sort). ``exclude``: optional ``(Q, G)`` bool mask of gallery
    entries a query must not retrieve (e.g. itself, or photos of its own individual); when fewer
    than ``k`` remain, the excluded ones fill the tail with similarity ``-inf``.
    """
    scores = cosine_similarities(query, gallery)
    if exclude is not None:
        scores = np.where(np.asarray(exclude, dtype=bool), -np.inf, scores)
    k = max(0, min(int(k), scores.shape[1]))
    order = _stable_top(scores, k)
    return order, np.take_along_axis(scores, order, axis=1)


def _stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices ``(Q, k)`` of each row's ``k`` largest ``scores (Q, G)``, best first, ties in
    column order: the first ``k`` columns of a stable descending argsort, without sorting all ``G``.

    A partial partition finds each row's ``k``-th score; only the columns at or above it (the
    ``k`` and any ties at the boundary) are sorted. Small galleries take the full sort, and so do
    rows with NaN scores (NaN sorts last there).
    """
    rows, columns = scores.shape
    if k == 0:
        return np.empty((rows, 0), dtype=np.intp)
    descending = -scores
    if 4 * k >= columns:
        return np.argsort(descending, axis=1, kind="stable")[:, :k]
    kth = np.partition(descending, k - 1, axis=1)[:, k - 1]
    with_nan = np.isnan(descending).any(axis=1)
    order = np.empty((rows, k), dtype=np.intp)
    for row in range(rows):
        if with_nan[row]:
            order[row] = np.argsort(descending[row], kind="stable")[:k]
            continue
        chosen = np.flatnonzero(descending[row] <= kth[row])  # ascending: ties stay in column order
        order[row] = chosen[np.argsort(descending[row, chosen], kind="stable")[:k]]
    return order


def retrieve(query: np.ndarray, gallery: np.ndarray, query_uris: Sequence[str], gallery_uris: Sequence[str],
             individuals: Mapping[str, str | None], k: int, pair_id: Callable[[str, str], str]
             ) -> tuple[list[Candidate], dict[str, int]]:
    """Each query's ``k`` most similar gallery images (:func:`top_k`), as candidates.

    Args:
        query, gallery: ``(Q, D)`` and ``(G, D)`` embeddings of ``query_uris`` and ``gallery_uris``.
        individuals: individual of each gallery image (None or "" when unknown).
        pair_id: the id of a (query, gallery image) pair.

    Returns:
        the candidates (query by query, best first) and each one's retrieval rank by pair id.
    """
    order, scores = top_k(query, gallery, k)
    candidates, ranks = [], {}
    for qi, uri in enumerate(query_uris):
        for rank, (gi, score) in enumerate(zip(order[qi], scores[qi])):
            image = gallery_uris[gi]
            candidate = Candidate(uri, image, float(score), pair_id(uri, image), individuals[image] or None)
            candidates.append(candidate)
            ranks[candidate.pair_id] = rank
    return candidates, ranks


def best_reranked(candidates: Sequence[Candidate], irm: Mapping[str, float | None], k: int) -> list[str]:
    """Pair ids of each query's ``k`` best candidates by :func:`rerank_score` (rules of
    :func:`rank_candidates`), given each pair's IRM by pair id."""
    outcomes = {pid: PairOutcome(layer="", irm=value) for pid, value in irm.items()}
    return [ranked.candidate.pair_id for ranked in rank_candidates(candidates, outcomes) if ranked.rank < k]


def _defined(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def rerank_score(similarity: float, irm: float | None, weight: float = RERANK_IRM_WEIGHT) -> float:
    """``(1 - weight) * similarity + weight * irm``; just ``similarity`` when IRM is undefined."""
    if not _defined(irm):
        return float(similarity)
    return (1.0 - weight) * float(similarity) + weight * float(irm)


def rank_candidates(
    candidates: Sequence[Candidate],
    outcomes: Mapping[str, PairOutcome],
    *,
    weight: float = RERANK_IRM_WEIGHT,
) -> list[RankedCandidate]:
    """Per query, candidates sorted by re-rank score.

    A query with any candidate lacking an IRM is scored by similarity alone (module docstring).

    Args:
        candidates: retrieved pairs (any order, several queries).
        outcomes: by ``pair_id``, the explanation at the ranking layer; a pair without one keeps
            its similarity as score and gets ``irm`` and ``outcome`` None.

    Returns:
        queries in order of first appearance, each one's candidates best first; ties keep
        retrieval order (stable sort).
    """
    by_query: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_query.setdefault(candidate.query, []).append(candidate)
    ranked: list[RankedCandidate] = []
    for mine in by_query.values():
        found = [outcomes.get(candidate.pair_id) for candidate in mine]
        irms = [o.irm if o is not None and _defined(o.irm) else None for o in found]
        blend = all(irm is not None for irm in irms)  # else: similarity alone for every candidate
        scored = []
        for candidate, outcome, irm in zip(mine, found, irms):
            score = rerank_score(candidate.similarity, irm, weight) if blend else float(candidate.similarity)
            scored.append((score, candidate, outcome, irm))
        scored.sort(key=lambda entry: -entry[0])
        ranked.extend(RankedCandidate(candidate, rank, score, irm, outcome)
                      for rank, (score, candidate, outcome, irm) in enumerate(scored))
    return ranked
