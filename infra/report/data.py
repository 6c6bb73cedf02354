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

import numpy as np
import pandas as pd

from ..storage import safe_segment
from ..tables import read_table

PAIR_COLUMNS = ["pair_id", "image_0", "image_1", "layer", "similarity", "irm", "n_matches", "inliers", "box_0",
                "box_1", "theta_0", "theta_1", "model_id", "model_spec", "output_key", "commit_id", "created_at",
                "date"]
CANDIDATE_COLUMNS = ["query", "rank", "gallery_image", "individual", "similarity", "irm", "rerank_score", "pair_id",
                     "layer", "output_key", "model_id", "model_spec", "date", "explained"]
ERROR_COLUMNS = ["item", "stage", "error_type", "message", "model_id", "run_id", "date"]


@dataclass(frozen=True)
class Photo:
    """An image as the model saw it: URI plus crop box and rotation."""

    uri: str
    box: tuple[float, ...] | None = None
    theta: float = 0.0


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


@dataclass
class Night:
    date: str
    model_id: str
    model_spec: str | None
    uploads: list[Upload]
    errors: pd.DataFrame
    ranked: bool  # from the candidates table (re-ranked) or from pairs (by similarity)

    @property
    def slug(self) -> str:
        return f"{self.date}_{safe_segment(self.model_id)}"

    @property
    def n_pairs(self) -> int:
        return sum(len(u.cards) for u in self.uploads)

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
            uploads = _from_pairs(mine_p)
        nights.append(Night(night_date, model_id, _first_spec(mine_c, mine_p), uploads,
                            mine_e.reset_index(drop=True), ranked=bool(len(mine_c))))
    return nights


def _judged_only(explained: Any) -> bool:
    """True for candidates rows marked not explained (null, as before re-ranking existed: shown)."""
    return isinstance(explained, (bool, np.bool_)) and not bool(explained)


def _from_candidates(frame: pd.DataFrame, by_key: dict, by_pair: dict, model_id: str) -> list[Upload]:
    uploads: dict[str, Upload] = {}
    for row in frame.sort_values(["query", "rank"], kind="stable").itertuples(index=False):
        if _judged_only(row.explained):  # re-ranked by stage 1 but not explained in full: no picture
            continue
        pair = by_key.get(row.output_key) if _text(row.output_key) else None
        if pair is None and _text(row.pair_id) and _text(row.layer):
            pair = by_pair.get((model_id, row.pair_id, row.layer))
        if pair is None:  # rows written before candidates recorded their pair
            pair = by_pair.get((model_id, row.query, row.gallery_image))
        query_photo = Photo(row.query, _box(pair.box_0), _number(pair.theta_0) or 0.0) if pair is not None \
            else Photo(row.query)
        upload = uploads.setdefault(row.query, Upload(query_photo))
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


def _from_pairs(frame: pd.DataFrame) -> list[Upload]:
    uploads: dict[tuple, Upload] = {}
    frame = frame.drop_duplicates(["pair_id"], keep="last")  # one card per pair: its latest first-layer row
    frame = frame.sort_values(["image_0", "similarity"], ascending=[True, False], kind="stable")
    for row in frame.itertuples(index=False):
        photo = Photo(row.image_0, _box(row.box_0), _number(row.theta_0) or 0.0)
        upload = uploads.setdefault((photo.uri, photo.box, photo.theta), Upload(photo))
        upload.cards.append(Card(
            rank=len(upload.cards), photo=Photo(row.image_1, _box(row.box_1), _number(row.theta_1) or 0.0),
            individual=None, similarity=_number(row.similarity), irm=_number(row.irm), rerank_score=None,
            pair_id=row.pair_id, layer=row.layer, output_key=row.output_key,
            n_matches=int(row.n_matches) if _number(row.n_matches) is not None else None,
            commit_id=_text(row.commit_id),
        ))
    return list(uploads.values())
