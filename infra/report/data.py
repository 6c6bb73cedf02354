"""What the review site shows, read from the output tables: nights, uploads, candidates, errors.

A *night* is one ``(date, model_id)`` partition: the UTC write date of the rows and the model.
Its uploads come from the ``candidates`` table (``nightly``: ranked candidates per upload) or,
for nights with pairs but no candidates (``explain``), from ``pairs`` grouped by ``image_0`` and
ordered by similarity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..storage import safe_segment
from ..tables import read_table

PAIR_COLUMNS = ["pair_id", "image_0", "image_1", "layer", "similarity", "irm", "n_matches", "inliers", "box_0",
                "box_1", "theta_0", "theta_1", "model_id", "model_spec", "output_key", "commit_id", "created_at",
                "date", "run_id"]
CANDIDATE_COLUMNS = ["query", "rank", "gallery_image", "individual", "similarity", "irm", "rerank_score", "pair_id",
                     "layer", "output_key", "model_id", "model_spec", "date", "explained", "top_k", "run_id",
                     "query_detection", "query_detection_id"]
ERROR_COLUMNS = ["item", "stage", "error_type", "message", "model_id", "run_id", "date"]
RUN_COLUMNS = ["model_id", "model_spec", "random_weights", "flow", "date"]
#: two neighbouring candidates whose scores differ by at most this much are flagged as a near tie
NEAR_TIE = 0.01
#: the model the ``pairx demo`` runs (trained on synthetic animals only)
DEMO_SPEC = "demo"


@dataclass(frozen=True)
class Photo:
    """An image as the model saw it: URI plus crop box and rotation."""

    uri: str
    box: tuple[float, ...] | None = None
    theta: float = 0.0
    #: the whole photo with ``box`` drawn on it (a detection shown in its frame), not the chip
    framed: bool = False


@dataclass
class Card:
    """One candidate of an upload (or one pair of an ``explain`` night)."""

    rank: int
    photo: Photo
    individual: str | None
    similarity: float | None
    irm: float | None
    rerank_score: float | None
    pair_id: str | None
    layer: str | None
    output_key: str | None
    n_matches: int | None = None
    #: batch write of the pairs row (part of the picture's file name)
    commit_id: str | None = None


@dataclass
class Upload:
    photo: Photo
    cards: list[Card] = field(default_factory=list)
    #: run that wrote the upload's rows (the first card's)
    run_id: str | None = None
    #: index of the upload's detection in its frame (camera-trap nights), else None
    detection: int | None = None
    #: stable identity of that detection (``candidates.query_detection_id``), else None
    detection_id: str | None = None

    @property
    def name(self) -> str:
        name = self.photo.uri.rstrip("/").rsplit("/", 1)[-1]
        return name if self.detection is None else f"{name} (detection {self.detection})"


@dataclass
class Night:
    date: str
    model_id: str
    model_spec: str | None
    uploads: list[Upload]
    errors: pd.DataFrame
    ranked: bool  # from the candidates table (re-ranked) or from pairs (by similarity)
    #: a run of this model recorded random weights (or its spec has none): scores mean nothing
    random_weights: bool = False
    #: the ``demo`` model on photos that are not the demo's own synthetic ones
    demo_elsewhere: bool = False
    #: other models that explained the same pairs first (a ``reprocess`` night): ``model_id -> spec``
    source_models: dict[str, str | None] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return f"{self.date}_{safe_segment(self.model_id)}"

    @property
    def n_pairs(self) -> int:
        return sum(len(u.cards) for u in self.uploads)

    @property
    def is_demo_model(self) -> bool:
        return self.model_spec == DEMO_SPEC or self.model_id == DEMO_SPEC

    @property
    def top_k(self) -> int:
        return max((len(u.cards) for u in self.uploads), default=0)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _box(value: Any) -> tuple[float, ...] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return tuple(float(v) for v in value)


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _first_spec(*frames: pd.DataFrame) -> str | None:
    for frame in frames:
        if "model_spec" in frame and frame["model_spec"].notna().any():
            return str(frame["model_spec"].dropna().iloc[-1])
    return None


def load_nights(out: str, *, date: str | None = None, model: str | None = None,
                storage_options: Mapping[str, Any] | None = None) -> list[Night]:
    """Every night under ``out`` (or those of ``date`` / ``model``), newest first.

    ``model`` is a ``model_id`` or a model spec as recorded in ``model_spec``.
    """
    so = storage_options
    pairs = read_table(out, "pairs", columns=PAIR_COLUMNS, storage_options=so)
    candidates = read_table(out, "candidates", columns=CANDIDATE_COLUMNS, storage_options=so)
    errors = read_table(out, "errors", columns=ERROR_COLUMNS, storage_options=so)
    individuals = gallery_individuals(candidates)
    models_of_pair = pairs.groupby("pair_id")["model_id"].agg(set).to_dict() if len(pairs) else {}
    specs = pairs.dropna(subset=["model_spec"]).drop_duplicates("model_id", keep="last") \
        .set_index("model_id")["model_spec"].to_dict() if len(pairs) else {}
    if model is not None:
        def keep(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[(frame["model_id"] == model) | (frame.get("model_spec", pd.Series(dtype=object)) == model)]
        ids = set(keep(pairs)["model_id"]) | set(keep(candidates)["model_id"]) | {model}
        pairs, candidates, errors = (f[f["model_id"].isin(ids)] for f in (pairs, candidates, errors))
    keys = set()
    for frame in (pairs, candidates, errors):
        keys.update(zip(frame["date"].astype(str), frame["model_id"]))
    if date is not None:
        keys = {k for k in keys if k[0] == str(date)}
    pairs = pairs.sort_values("created_at", kind="stable")
    by_key = {row.output_key: row for row in pairs.itertuples(index=False)}
    by_pair: dict[tuple, Any] = {}
    for row in pairs.itertuples(index=False):  # later rows win
        by_pair[(row.model_id, row.pair_id, row.layer)] = row
        by_pair.setdefault((row.model_id, row.image_0, row.image_1), row)
    nights = []
    for night_date, model_id in sorted(keys, key=lambda k: (k[0], k[1]), reverse=True):
        mine_c = candidates[(candidates["date"].astype(str) == night_date) & (candidates["model_id"] == model_id)]
        mine_p = pairs[(pairs["date"].astype(str) == night_date) & (pairs["model_id"] == model_id)]
        mine_e = errors[(errors["date"].astype(str) == night_date) & (errors["model_id"] == model_id)]
        if len(mine_c):
            uploads = _from_candidates(mine_c, by_key, by_pair, model_id)
        else:
            uploads = _from_pairs(mine_p, individuals)
        night = Night(night_date, model_id, _first_spec(mine_c, mine_p), uploads, mine_e.reset_index(drop=True),
                      ranked=bool(len(mine_c)))
        if not len(mine_c):
            others = set().union(*(models_of_pair.get(p, set()) for p in mine_p["pair_id"].unique())) - {model_id}
            night.source_models = {other: specs.get(other) for other in sorted(others)}
        nights.append(night)
    runs = read_table(out, "runs", columns=RUN_COLUMNS, storage_options=so)
    flagged = random_weight_models(runs, nights)
    for night in nights:
        night.random_weights = night.model_id in flagged
    return nights


def reviewed(candidates: pd.DataFrame) -> pd.Series:
    """Mask of the ``candidates`` rows a reviewer is shown: explained in full (null, as before
    re-ranking existed: shown) and ranked above the night's ``top_k`` (null in older rows: shown).

    Re-ranking can push a candidate explained first out of the final ``top_k``: it keeps its picture
    but is not among the night's choice for review."""
    explained = candidates["explained"].fillna(True).astype(bool)
    below_top_k = (candidates["rank"] >= candidates["top_k"]).fillna(False).astype(bool)
    return explained & ~below_top_k


def _from_candidates(frame: pd.DataFrame, by_key: dict, by_pair: dict, model_id: str) -> list[Upload]:
    uploads: dict[tuple, Upload] = {}
    for row in frame[reviewed(frame)].sort_values(["query", "rank"], kind="stable").itertuples(index=False):
        pair = by_key.get(row.output_key) if _text(row.output_key) else None
        if pair is None and _text(row.pair_id) and _text(row.layer):
            pair = by_pair.get((model_id, row.pair_id, row.layer))
        if pair is None:  # rows written before candidates recorded their pair
            pair = by_pair.get((model_id, row.query, row.gallery_image))
        query_photo = Photo(row.query, _box(pair.box_0), _number(pair.theta_0) or 0.0) if pair is not None \
            else Photo(row.query)
        detection = _number(getattr(row, "query_detection", None))
        detection = None if detection is None else int(detection)
        upload = uploads.setdefault((row.query, detection), Upload(
            query_photo, run_id=_text(row.run_id), detection=detection,
            detection_id=_text(getattr(row, "query_detection_id", None))))
        upload.cards.append(Card(
            rank=int(row.rank),
            photo=Photo(row.gallery_image, _box(pair.box_1), _number(pair.theta_1) or 0.0) if pair is not None
            else Photo(row.gallery_image),
            individual=_text(row.individual), similarity=_number(row.similarity), irm=_number(row.irm),
            rerank_score=_number(row.rerank_score),
            pair_id=pair.pair_id if pair is not None else _text(row.pair_id),
            layer=pair.layer if pair is not None else _text(row.layer),
            output_key=pair.output_key if pair is not None else _text(row.output_key),
            n_matches=int(pair.n_matches) if pair is not None and _number(pair.n_matches) is not None else None,
            commit_id=_text(pair.commit_id) if pair is not None else None,
        ))
    return list(uploads.values())


def gallery_individuals(candidates: pd.DataFrame) -> dict[str, str]:
    """Gallery image URI -> individual, from candidates rows (``gallery_image``, ``individual``; later rows win)."""
    named = candidates[candidates["individual"].notna()]
    return dict(zip(named["gallery_image"], named["individual"].astype(str)))


def _from_pairs(frame: pd.DataFrame, individuals: Mapping[str, str]) -> list[Upload]:
    """Uploads of a night without candidates rows (``explain``, ``reprocess``): pairs by first image.

    A second image some other run ranked as a gallery candidate gets that individual.
    """
    uploads: dict[tuple, Upload] = {}
    frame = frame.drop_duplicates(["pair_id"], keep="last")  # one card per pair: its latest first-layer row
    frame = frame.sort_values(["image_0", "similarity"], ascending=[True, False], kind="stable")
    for row in frame.itertuples(index=False):
        photo = Photo(row.image_0, _box(row.box_0), _number(row.theta_0) or 0.0)
        upload = uploads.setdefault((photo.uri, photo.box, photo.theta), Upload(photo, run_id=_text(row.run_id)))
        upload.cards.append(Card(
            rank=len(upload.cards), photo=Photo(row.image_1, _box(row.box_1), _number(row.theta_1) or 0.0),
            individual=individuals.get(row.image_1), similarity=_number(row.similarity), irm=_number(row.irm),
            rerank_score=None,
            pair_id=row.pair_id, layer=row.layer, output_key=row.output_key,
            n_matches=int(row.n_matches) if _number(row.n_matches) is not None else None,
            commit_id=_text(row.commit_id),
        ))
    return list(uploads.values())


def score_of(card: Card, ranked: bool) -> float | None:
    """The score a card is ordered by: re-rank score on ranked nights, else similarity."""
    return card.rerank_score if ranked else card.similarity


def near_ties(cards: list[Card], ranked: bool, within: float = NEAR_TIE) -> dict[int, list[int]]:
    """For each card's ``rank``, the ranks of its neighbours whose score is within ``within`` of its own.

    Only neighbours in the order shown count (a tie is a pair of adjacent candidates a reviewer
    could swap); a card without a score ties with nothing.
    """
    ties: dict[int, list[int]] = {}
    for left, right in zip(cards, cards[1:]):
        a, b = score_of(left, ranked), score_of(right, ranked)
        if a is None or b is None or abs(a - b) > within + 1e-9:
            continue
        ties.setdefault(left.rank, []).append(right.rank)
        ties.setdefault(right.rank, []).append(left.rank)
    return ties


def _spec_random(spec: str | None) -> bool:
    if not spec:
        return False
    from pairx_core.models import would_use_random_weights

    try:
        return would_use_random_weights(spec)
    except Exception:  # noqa: BLE001 - an unknown or redacted spec: the runs table decides
        return False


def random_weight_models(runs: pd.DataFrame, nights: list[Night]) -> set[str]:
    """``model_id`` values that ran with random weights: from ``runs``, else from their specs."""
    flagged = set(runs.loc[runs["random_weights"].fillna(False).astype(bool), "model_id"])
    recorded = set(runs["model_id"])
    for night in nights:
        if night.model_id not in recorded and _spec_random(night.model_spec):
            flagged.add(night.model_id)
    return flagged
