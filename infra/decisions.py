"""Reviewer decisions on uploads: checking them, turning them into ``decisions`` rows, reading them back.

A decision names an upload and says what it is: ``match`` (one of its candidates, or a known
individual), ``new_individual`` (a new name), ``no_match`` or ``unsure``; ``undo`` withdraws the
upload's current decision. An upload is one photo (the ``query`` of the ``candidates`` table) or,
on a camera-trap night, one detection in it: decisions are keyed by :data:`UploadKey` ``(query,
content hash, detection id)``, so the two animals of one frame get two independent decisions.
Rows are only ever added: the latest row per upload (by ``decided_at``) is the one that counts,
an ``undo`` as the latest row makes the upload pending again.

The review server (``infra.report.server``) and ``pairx decide`` both go through
:func:`DecisionRequest.from_mapping` and :func:`resolve_decision`, so they accept and refuse the
same things. Request values are data only: they are looked up in tables read here, never used
as a file path or put in SQL text.
"""

from __future__ import annotations

import csv
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pairx_core.errors import ConfigError

from .records import decision_row
from .storage import StorageTarget
from .tables import read_table, write_table

__all__ = [
    "DECISION_KINDS",
    "CSV_COLUMNS",
    "DecisionConflictError",
    "DecisionError",
    "DecisionRequest",
    "UnknownUploadError",
    "UploadIndex",
    "UploadKey",
    "UploadRun",
    "decision_key",
    "latest_by_upload",
    "plain_value",
    "read_decisions",
    "record_decisions",
    "requests_from_csv",
    "resolve_decision",
    "row_dicts",
    "write_decisions",
]

#: decisions a reviewer makes; ``undo`` withdraws the current one
VERDICTS = ("match", "new_individual", "no_match", "unsure")
UNDO = "undo"
DECISION_KINDS = (*VERDICTS, UNDO)

_MAX_NAME = 200
_MAX_DETECTION_ID = 64
_MAX_URI = 4096
_MAX_NOTE = 2000


class DecisionError(ConfigError):
    """A decision that cannot be recorded as given (HTTP 400)."""

    status = 400


class UnknownUploadError(DecisionError):
    """The decision names an upload no night of this OUT ranked (HTTP 404)."""

    status = 404


class DecisionConflictError(DecisionError):
    """The decision does not fit this OUT's state: another OUT, a model or night the upload was not
    ranked by, nothing to undo, a new name that already exists (HTTP 409)."""

    status = 409


def _text(value: Any, name: str, limit: int, *, required: bool = False, multiline: bool = False) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DecisionError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise DecisionError(f"{name} must be a string, got {type(value).__name__}")
    value = value.strip()
    if len(value) > limit:
        raise DecisionError(f"{name} is longer than {limit} characters")
    allowed = "\n\t" if multiline else ""
    if any((ord(c) < 32 and c not in allowed) or ord(c) == 127 for c in value):
        raise DecisionError(f"{name} contains control characters")
    return value


def _box(value: Any) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise DecisionError(f"box must be 4 finite numbers x, y, w, h (original pixels), got {value!r}")
    return tuple(float(v) for v in value)


def _rank(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DecisionError(f"rank must be a 0-based candidate rank (integer >= 0), got {value!r}")
    return value


@dataclass(frozen=True)
class DecisionRequest:
    """One decision as asked for (API body, command-line options or a CSV row), checked for form.

    ``rank`` is the 0-based rank of the accepted candidate (``match``); alternatively
    ``gallery_image`` or ``individual`` picks it. ``model_id`` / ``night_run_id`` / ``out`` pin
    the night and the output root it was made on (default: the upload's latest night).
    ``detection_id`` (``candidates.query_detection_id``) or ``box`` (``candidates.query_box``)
    picks one detection of a camera-trap frame; a frame with one detection needs neither.
    """

    query: str
    decision: str
    reviewer: str
    detection_id: str | None = None
    box: tuple[float, float, float, float] | None = None
    rank: int | None = None
    gallery_image: str | None = None
    individual: str | None = None
    model_id: str | None = None
    night_run_id: str | None = None
    out: str | None = None
    note: str | None = None
    decided_at: datetime | None = None  # CSV imports only; otherwise the time it is recorded

    @classmethod
    def from_mapping(cls, data: Any, *, allow_decided_at: bool = False) -> DecisionRequest:
        """Check the shape and values of ``data`` (a JSON object); raise :class:`DecisionError`."""
        if not isinstance(data, Mapping):
            raise DecisionError("a decision must be a JSON object")
        known = {f.name for f in fields(cls)} - (set() if allow_decided_at else {"decided_at"})
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise DecisionError(f"unknown field(s) {unknown}; known: {sorted(known)}")
        decision = _text(data.get("decision"), "decision", 32, required=True)
        if decision not in DECISION_KINDS:
            raise DecisionError(f"decision must be one of {list(DECISION_KINDS)}, got {decision!r}")
        decided_at = data.get("decided_at")
        if decided_at is not None and not isinstance(decided_at, datetime):
            text = _text(decided_at, "decided_at", 64)
            try:
                decided_at = datetime.fromisoformat(text) if text else None
            except ValueError:
                raise DecisionError(f"decided_at must be an ISO timestamp, got {text!r}") from None
        if decided_at is not None and decided_at.tzinfo is None:
            decided_at = decided_at.replace(tzinfo=timezone.utc)
        return cls(
            query=_text(data.get("query"), "query", _MAX_URI, required=True),
            decision=decision,
            reviewer=_text(data.get("reviewer"), "reviewer", _MAX_NAME, required=True),
            detection_id=_text(data.get("detection_id"), "detection_id", _MAX_DETECTION_ID),
            box=_box(data.get("box")),
            rank=_rank(data.get("rank")),
            gallery_image=_text(data.get("gallery_image"), "gallery_image", _MAX_URI),
            individual=_text(data.get("individual"), "individual", _MAX_NAME),
            model_id=_text(data.get("model_id"), "model_id", _MAX_URI),
            night_run_id=_text(data.get("night_run_id"), "night_run_id", _MAX_NAME),
            out=_text(data.get("out"), "out", _MAX_URI),
            note=_text(data.get("note"), "note", _MAX_NOTE, multiline=True),
            decided_at=decided_at,
        )


# ------------------------------------------------------------------------------ what can be decided
def plain_value(value: Any) -> Any:
    """A table value as plain Python (NaN/NA -> None, numpy scalars -> Python)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return value
    return value


#: what a decision is on: ``(query, content hash, detection id)``; detection id None: the whole photo
UploadKey = tuple[str, "str | None", "str | None"]


def _key_part(value: Any) -> str | None:
    value = plain_value(value)
    return value if isinstance(value, str) and value else None


def decision_key(row: Mapping[str, Any]) -> UploadKey:
    """The :data:`UploadKey` of a ``decisions`` row (or any mapping with ``query``, ``content_hash``
    and ``detection_id``; a missing column counts as null)."""
    return (row["query"], _key_part(row.get("content_hash")), _key_part(row.get("detection_id")))


@dataclass(frozen=True)
class UploadRun:
    """One upload (a photo, or one detection in it) as one night run ranked it: its candidates
    (rank order) and where it came from."""

    query: str
    model_id: str
    run_id: str
    date: str
    created_at: datetime | None
    content_hash: str | None
    box: tuple[float, ...] | None
    candidates: tuple[dict, ...] = field(default_factory=tuple)
    #: ``candidates.query_detection_id`` / ``query_detection`` (None: the whole photo was the upload)
    detection_id: str | None = None
    detection: int | None = None

    @property
    def key(self) -> UploadKey:
        return (self.query, self.content_hash, self.detection_id)

    def candidate(self, *, rank: int | None, gallery_image: str | None, individual: str | None) -> dict | None:
        """The candidate a ``match`` accepts: by rank, else gallery image, else the best of an individual."""
        for row in self.candidates:
            if rank is not None and row["rank"] != rank:
                continue
            if gallery_image is not None and row["gallery_image"] != gallery_image:
                continue
            if individual is not None and rank is None and gallery_image is None and row["individual"] != individual:
                continue
            return row
        return None


_CANDIDATE_COLUMNS = ["query", "rank", "gallery_image", "individual", "similarity", "irm", "rerank_score",
                      "retrieval_rank", "output_key", "run_id", "model_id", "created_at", "date", "query_hash",
                      "query_detection", "query_detection_id", "query_box"]
_KEPT = ("rank", "gallery_image", "individual", "similarity", "irm", "rerank_score", "retrieval_rank")


def _same_box(a: Sequence[float] | None, b: Sequence[float] | None, tolerance: float = 0.5) -> bool:
    return a is not None and b is not None and all(abs(float(x) - float(y)) <= tolerance for x, y in zip(a, b))


class UploadIndex:
    """The uploads of an output root, per query (photo): every night run that ranked it or one of
    its detections, newest first."""

    def __init__(self, runs: Mapping[str, Sequence[UploadRun]], individuals: Iterable[str]):
        self._runs = {query: list(items) for query, items in runs.items()}
        self.individuals = frozenset(individuals)

    @classmethod
    def load(cls, out: str, storage_options: Mapping[str, Any] | None = None) -> UploadIndex:
        so = storage_options
        candidates = read_table(out, "candidates", columns=_CANDIDATE_COLUMNS, storage_options=so)
        pairs = read_table(out, "pairs", columns=["output_key", "box_0"], storage_options=so)
        images = read_table(out, "images", columns=["image_uri", "content_hash"], storage_options=so)
        boxes = {key: plain_value(box) for key, box in zip(pairs["output_key"], pairs["box_0"])}
        hashes: dict[str, str] = {}
        for uri, digest in zip(images["image_uri"], images["content_hash"]):
            hashes.setdefault(uri, digest)
        runs: dict[str, list[UploadRun]] = {}
        candidates = candidates.sort_values(["created_at", "rank"], kind="stable")
        candidates["query_detection_id"] = candidates["query_detection_id"].map(_key_part)
        by_upload = candidates.groupby(["query", "query_detection_id", "model_id", "run_id"], sort=False, dropna=False)
        for (query, detection_id, model_id, run_id), group in by_upload:
            group = group.drop_duplicates("rank", keep="last")
            rows = tuple({name: plain_value(getattr(r, name)) for name in _KEPT}
                         for r in group.itertuples(index=False))
            first = group.iloc[0]
            box = plain_value(first["query_box"])
            box = None if box is None or len(box) != 4 else tuple(float(v) for v in box)
            for key in ([] if box is not None else group["output_key"]):
                found = boxes.get(key) if isinstance(key, str) else None
                if found is not None:
                    box = tuple(float(v) for v in found)
                    break
            detection = plain_value(first["query_detection"])
            created = plain_value(group["created_at"].min())
            runs.setdefault(query, []).append(UploadRun(
                query=query, model_id=model_id, run_id=run_id, date=str(group["date"].iloc[0]),
                created_at=created.to_pydatetime() if hasattr(created, "to_pydatetime") else created,
                content_hash=_key_part(first["query_hash"]) or hashes.get(query), box=box, candidates=rows,
                detection_id=_key_part(detection_id), detection=None if detection is None else int(detection)))
        for items in runs.values():
            items.sort(key=lambda run: (run.created_at is not None, run.created_at), reverse=True)
        individuals = {str(v) for v in candidates["individual"].dropna()}
        return cls(runs, individuals)

    def __contains__(self, query: str) -> bool:
        return query in self._runs

    def queries(self) -> list[str]:
        """Every upload of the output root, sorted."""
        return sorted(self._runs)

    def runs(self, query: str) -> list[UploadRun]:
        return list(self._runs.get(query, ()))

    def uploads(self) -> list[UploadRun]:
        """The latest night run of every upload (photo or detection), sorted by query."""
        latest: dict[tuple, UploadRun] = {}
        for query in self.queries():
            for run in self._runs[query]:
                latest.setdefault((query, run.detection_id), run)
        return list(latest.values())

    def find(self, query: str, model_id: str | None = None, night_run_id: str | None = None, *,
             detection_id: str | None = None, box: Sequence[float] | None = None) -> UploadRun:
        """The night run a decision on ``query`` (and its detection ``detection_id``, or the one
        at ``box``) refers to: the latest one matching the pins.

        Raises:
            UnknownUploadError: no night ranked ``query``, or not that detection of it (404).
            DecisionError: the photo's detections were ranked one by one and none is named (400).
        """
        runs = self._runs.get(query)
        if not runs:
            raise UnknownUploadError(f"unknown upload {query!r}: no night of this OUT ranked it")
        if detection_id is not None:
            runs = [r for r in runs if r.detection_id == detection_id]
            if not runs:
                raise UnknownUploadError(f"unknown detection {detection_id!r} of upload {query!r}: no night of "
                                         "this OUT ranked it (see candidates.query_detection_id)")
        elif box is not None:
            runs = [r for r in runs if r.detection_id is not None and _same_box(r.box, box)]
            if not runs:
                raise UnknownUploadError(f"upload {query!r} has no ranked detection at box {list(box)} "
                                         "(see candidates.query_box)")
        elif any(r.detection_id is None for r in runs):
            runs = [r for r in runs if r.detection_id is None]  # the whole photo
        else:
            detections = {r.detection_id for r in runs}
            if len(detections) > 1:
                raise DecisionError(f"upload {query!r} was ranked per detection ({len(detections)} of them): "
                                    "name one with detection_id (candidates.query_detection_id) or box")
        if model_id is not None:
            mine = runs
            runs = [r for r in runs if r.model_id == model_id]
            if not runs:
                models = sorted({r.model_id for r in mine})
                raise DecisionConflictError(f"model {model_id!r} did not rank upload {query!r} in this OUT "
                                            f"(models that did: {models})")
        if night_run_id is not None:
            runs = [r for r in runs if r.run_id == night_run_id]
            if not runs:
                raise DecisionConflictError(f"night run {night_run_id!r} did not rank upload {query!r}"
                                            + (f" with model {model_id!r}" if model_id else ""))
        return runs[0]


# ------------------------------------------------------------------------------ checking one decision
def _same_out(given: str, out: str) -> bool:
    """Whether ``given`` (from a request: compared as text, never opened) names the output root ``out``."""
    canonical = StorageTarget.from_url(out).url().rstrip("/")
    text = given.strip().rstrip("/")
    return text in (canonical, f"file://{canonical}", out.rstrip("/"))


def resolve_decision(request: DecisionRequest, index: UploadIndex, latest: Mapping[UploadKey, Mapping[str, Any]], *,
                     out: str, run_id: str, decided_at: datetime | None = None) -> dict:
    """The ``decisions`` row of ``request``, or :class:`DecisionError` (400/404/409) saying why not.

    Args:
        index: the uploads of ``out`` (:meth:`UploadIndex.load`).
        latest: the latest decision row per upload so far (:func:`latest_by_upload`).
        run_id: the session recording the decision (``run_id`` column).
        decided_at: when (default: ``request.decided_at``, else now).
    """
    if request.out is not None and not _same_out(request.out, out):
        raise DecisionConflictError(f"the decision is for OUT {request.out!r}, but this is {out!r}")
    upload = index.find(request.query, request.model_id, request.night_run_id, detection_id=request.detection_id,
                        box=request.box)
    previous = latest.get(upload.key)
    current = previous if previous is not None and previous["decision"] != UNDO else None
    candidate, individual = None, None
    picks = (request.rank, request.gallery_image)
    if request.decision == "match":
        if request.rank is None and request.gallery_image is None and request.individual is None:
            raise DecisionError("a match needs the accepted candidate: rank, gallery_image or individual")
        candidate = upload.candidate(rank=request.rank, gallery_image=request.gallery_image,
                                     individual=request.individual)
        if candidate is None and (request.rank is not None or request.gallery_image is not None):
            raise DecisionError(f"upload {request.query!r} has no such candidate in night run {upload.run_id!r} "
                                f"(rank={request.rank}, gallery_image={request.gallery_image!r})")
        if candidate is not None:
            individual = candidate["individual"]
            if request.individual is not None and individual != request.individual:
                raise DecisionError(f"candidate {candidate['rank']} of {request.query!r} is individual "
                                    f"{individual!r}, not {request.individual!r}")
        else:
            if request.individual not in index.individuals:
                raise DecisionError(f"unknown individual {request.individual!r}: decide new_individual to name one")
            individual = request.individual
        if individual is None:
            raise DecisionError(f"candidate {candidate['rank']} of {request.query!r} has no individual id; "
                                "decide new_individual to name it")
    elif request.decision == "new_individual":
        if any(p is not None for p in picks):
            raise DecisionError("new_individual takes a name (individual), not a candidate")
        if request.individual is None:
            raise DecisionError("new_individual needs the new individual's name (individual)")
        if request.individual in index.individuals:
            raise DecisionConflictError(f"individual {request.individual!r} already exists: decide match")
        individual = request.individual
    else:
        if any(p is not None for p in (*picks, request.individual)):
            raise DecisionError(f"{request.decision} takes no candidate or individual")
        if request.decision == UNDO and current is None:
            raise DecisionConflictError(f"upload {request.query!r} has no decision to undo")
    when = decided_at or request.decided_at or datetime.now(timezone.utc)
    return decision_row(
        decision_id=uuid.uuid4().hex, query=request.query, content_hash=upload.content_hash, box=upload.box,
        detection_id=upload.detection_id,
        decision=request.decision, individual=individual, candidate=candidate, model_id=upload.model_id,
        night_run_id=upload.run_id, reviewer=request.reviewer, decided_at=when,
        supersedes=previous["decision_id"] if previous is not None else None, note=request.note, run_id=run_id)


# ------------------------------------------------------------------------------ reading and writing
def read_decisions(out: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Every ``decisions`` row, oldest first (``decided_at``, then ``decision_id``)."""
    frame = read_table(out, "decisions", storage_options=storage_options)
    return frame.sort_values(["decided_at", "decision_id"], kind="stable").reset_index(drop=True)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_pydatetime"):
        return None if value is pd.NaT else value.to_pydatetime()
    if hasattr(value, "tolist") and getattr(value, "ndim", 0):
        return value.tolist()
    return value if isinstance(value, (list, tuple)) else plain_value(value)


def row_dicts(frame: pd.DataFrame) -> list[dict]:
    """The rows of a table read back, as plain Python (datetimes, lists, None for missing values)."""
    return [{key: _plain(value) for key, value in row.items()} for row in frame.to_dict("records")]


def latest_by_upload(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> dict[UploadKey, dict]:
    """The latest row per upload (:func:`decision_key`) of ``rows`` (ordered oldest first), undo
    rows included."""
    records = row_dicts(rows) if isinstance(rows, pd.DataFrame) else rows
    latest: dict[UploadKey, dict] = {}
    for row in records:
        key = decision_key(row)
        known = latest.get(key)
        if known is None or (row["decided_at"], row["decision_id"]) >= (known["decided_at"], known["decision_id"]):
            latest[key] = row
    return latest


def write_decisions(out: str, rows: Sequence[Mapping[str, Any]], run_id: str,
                    storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Write ``rows`` to the ``decisions`` table: one Parquet file per model; returns their URLs."""
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model_id"], []).append(row)
    written = []
    for model_id, group in by_model.items():
        url = write_table(out, "decisions", group, model_id, run_id, storage_options)
        if url:
            written.append(url)
    return written


def record_decisions(out: str, requests: Sequence[DecisionRequest], *, run_id: str | None = None,
                     labels: Sequence[str] | None = None,
                     storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Check every request (in order, each seeing the ones before) and write them all, or none.

    Raises:
        DecisionError: naming the first request that fails by its label (``labels``, e.g. the CSV
            line) or, when there are several, its 1-based number.
    """
    run_id = run_id or f"decide-{uuid.uuid4().hex[:12]}"
    index = UploadIndex.load(out, storage_options)
    latest = latest_by_upload(read_decisions(out, storage_options))
    rows = []
    for number, request in enumerate(requests, start=1):
        try:
            row = resolve_decision(request, index, latest, out=out, run_id=run_id)
        except DecisionError as error:
            if labels is not None:
                raise type(error)(f"{labels[number - 1]}: {error}") from None
            if len(requests) > 1:
                raise type(error)(f"decision #{number}: {error}") from None
            raise
        latest[decision_key(row)] = row
        rows.append(row)
    write_decisions(out, rows, run_id, storage_options)
    return rows


#: columns of a ``pairx decide --from-csv`` file (``query``, ``decision``, ``reviewer`` required)
CSV_COLUMNS = ("query", "decision", "reviewer", "detection_id", "individual", "rank", "gallery_image", "model_id",
               "night_run_id", "note", "decided_at")


def requests_from_csv(path: str | Path) -> tuple[list[DecisionRequest], list[str]]:
    """The decisions of a CSV file (header row; :data:`CSV_COLUMNS`; empty cells = not given), and
    a label per decision naming its file and line.

    Raises:
        DecisionError: naming the file, the line and the column of the first bad value.
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise DecisionError(f"{path}: cannot read ({error.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        unknown = [c for c in header if c not in CSV_COLUMNS]
        missing = [c for c in ("query", "decision", "reviewer") if c not in header]
        if unknown or missing:
            raise DecisionError(f"{path}: " + "; ".join(
                part for part in (f"unknown column(s) {unknown}" if unknown else "",
                                  f"missing column(s) {missing}" if missing else "") if part)
                + f" (columns: {', '.join(CSV_COLUMNS)})")
        requests, labels = [], []
        for row in reader:
            line = reader.line_num
            values: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items() if k is not None}
            if None in row:
                raise DecisionError(f"{path}, line {line}: more cells than columns")
            if values.get("rank") is not None:
                try:
                    values["rank"] = int(values["rank"])
                except ValueError:
                    raise DecisionError(
                        f"{path}, line {line}, column rank: not an integer: {values['rank']!r}") from None
            try:
                requests.append(DecisionRequest.from_mapping(values, allow_decided_at=True))
                labels.append(f"{path}, line {line}")
            except DecisionError as error:
                raise DecisionError(f"{path}, line {line}: {error}") from None
    if not requests:
        raise DecisionError(f"{path}: no decisions (header only)")
    return requests, labels
