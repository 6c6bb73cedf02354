"""The review site: static HTML under ``<OUT>/report/`` for people who check PAIR-X explanations.

:func:`build_report` reads the output tables (``infra.tables.read_table``) and writes, through
``infra.storage`` (local folders, ``s3://``, any fsspec URL):

- ``report/index.html``: every night (date, model, uploads, pairs, failures; decided, pending and
  the median time to decision), then model precision and plausibility calibration, read through
  the dashboard views ``review_progress``, ``model_precision``, ``plausibility_calibration``
  (``infra/views.sql``) as they stand when the index is written;
- ``report/nights/<date>_<model_id>/index.html`` (+ ``page-2.html`` ...): each upload with its
  clean photo and its ranked candidates side by side (clean candidate photo, individual,
  similarity, IRM, re-rank score, PAIR-X picture; click to enlarge), then the night's errors;
- ``report/nights/<date>_<model_id>/pair-<upload>-<rank>.html``: one page per explained pair for
  reviewers: the full-resolution PAIR-X picture, both photos, individual names, the metrics, a
  near-tie flag, links (and keys) to the next/previous pair and upload;
- ``report/thumbs/*.jpg``: small derived images; night pages never scale a full PNG.

Every page of a night whose model ran with random weights carries a banner, and so does every page
of a night of the ``demo`` model on photos other than the demo's own synthetic ones. Upload
blocks carry stable hooks (``id='u<n>'``, ``data-query``, ``data-run``, ``data-model``,
``data-date``; pair pages ``id='pair'`` with ``data-gallery``, ``data-pair``, ``data-rank`` too).

Links are relative, there is no server and no external resource, so the site opens from a
local folder, a bucket behind a static web endpoint, or a downloaded copy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..storage import StorageTarget
from ..viz import public_link, relative_to_out, viz_uri
from . import pages
from .data import Card, Night, load_nights
from .figures import load_review_figures
from .thumbs import ThumbWriter

__all__ = ["DEFAULT_PAGE_SIZE", "ReportResult", "build_report", "refresh_index", "write_index"]

logger = logging.getLogger(__name__)

#: what ``pairx demo`` writes next to its output root: the truth of its synthetic photos
DEMO_TRUTH_FILE = "ground_truth.json"
#: uploads per night page
DEFAULT_PAGE_SIZE = 50


@dataclass
class ReportResult:
    """Where the site is: ``index_url`` (storage URL) and, with a public base, ``public_index_url``."""

    index_url: str
    public_index_url: str | None
    nights: int
    pages: list[str] = field(default_factory=list)
    thumbs_written: int = 0

    @property
    def url(self) -> str:
        """The address to print: the public one when there is one."""
        return self.public_index_url or self.index_url


def build_report(
    out: str,
    date: str | None = None,
    model: str | None = None,
    *,
    public_url: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> ReportResult:
    """Write (or update) the review site of the output root ``out``.

    Args:
        out: output root URL (local folder, ``s3://bucket/prefix``, ...).
        date: only (re)write the pages of this night (``YYYY-MM-DD``); the index always lists all.
        model: only the nights of this model (a ``model_id`` or a spec as in ``model_spec``).
        public_url: base URL where ``out`` is published; the result then gives the report's URL
            under it. Links inside the site stay relative, so it still opens offline.
        page_size: uploads per night page.

    Returns:
        :class:`ReportResult`.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    storage = StorageTarget.from_url(out, storage_options)
    everything = load_nights(out, model=model, storage_options=storage_options)
    chosen = [n for n in everything if date is None or n.date == str(date)]
    thumbs = ThumbWriter(out, storage_options)
    written: list[str] = []

    for night in everything:
        night.demo_elsewhere = night.is_demo_model and not _demo_dataset(out, night, storage_options)
    for night in chosen:
        written += _write_night(night, storage, thumbs, out, storage_options, page_size)

    index = write_index(out, everything if model is None else None, storage_options=storage_options)
    written.append(index)
    public_index = public_link(out, index, public_url, storage_options) if public_url else None
    logger.info("report: %d night(s) written, %d thumbnail(s), index %s", len(chosen), thumbs.written, index)
    return ReportResult(index_url=index, public_index_url=public_index, nights=len(chosen), pages=written,
                        thumbs_written=thumbs.written)


def write_index(out: str, nights: list[Night] | None = None, *,
                storage_options: Mapping[str, Any] | None = None) -> str:
    """(Re)write ``report/index.html`` alone: every night (``nights`` when already loaded, banner flags
    set) with its review progress, then model precision and plausibility calibration, all read
    through the dashboard views. Returns its storage URL. Called after decisions are recorded
    outside a report build (``pairx demo --auto-decide``), so that the figures are current."""
    if nights is None:
        nights = load_nights(out, storage_options=storage_options)
        for night in nights:
            night.demo_elsewhere = night.is_demo_model and not _demo_dataset(out, night, storage_options)
    figures = load_review_figures(out, storage_options)
    storage = StorageTarget.from_url(out, storage_options)
    return storage.write_bytes_atomic(f"{pages.REPORT_DIR}/index.html", pages.index_html(nights, figures).encode())


def refresh_index(out: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Rewrite the index of an existing site (after decisions were recorded) so that its review
    figures are current; no site yet: nothing. A failure is logged, never raised: the decisions are
    already in their table, and the next report build rewrites the index anyway."""
    try:
        if not StorageTarget.from_url(out, storage_options).exists(f"{pages.REPORT_DIR}/index.html"):
            return None
        return write_index(out, storage_options=storage_options)
    except Exception:  # noqa: BLE001 - see above
        logger.warning("report: index not refreshed after decisions", exc_info=True)
        return None


def _demo_dataset(out: str, night: Night, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether every upload of ``night`` is one of ``pairx demo``'s synthetic photos.

    The demo writes its results to ``<demo folder>/results``, its synthetic photos under
    ``<demo folder>/data/`` and their truth to ``<demo folder>/ground_truth.json``.
    """
    storage = StorageTarget.from_url(out, storage_options)
    if not storage.is_local:
        return False
    demo_root = Path(storage.root).parent
    if not (demo_root / DEMO_TRUTH_FILE).is_file():
        return False
    photos = (demo_root / "data").resolve()
    return bool(night.uploads) and all(
        Path(upload.photo.uri.removeprefix("file://")).resolve().is_relative_to(photos) for upload in night.uploads)


def _write_night(night: Night, storage: StorageTarget, thumbs: ThumbWriter, out: str,
                 storage_options: Mapping[str, Any] | None, page_size: int) -> list[str]:
    photo_cache: dict = {}

    def photo_thumb(photo):
        if photo not in photo_cache:
            photo_cache[photo] = thumbs.photo(photo)
        return photo_cache[photo]

    def picture_png(card: Card) -> str | None:
        if not card.pair_id or not card.layer:
            return None
        return relative_to_out(out, viz_uri(out, night.model_id, card.pair_id, card.layer, storage_options,
                                            commit_id=card.commit_id), storage_options)

    picture_cache: dict = {}

    def picture_thumb(card: Card):
        key = (card.pair_id, card.layer, card.commit_id, card.output_key)
        if key not in picture_cache:
            png = picture_png(card)
            preview = None if png is None else thumbs.picture(png, card.output_key)
            picture_cache[key] = None if preview is None else (preview, png)
        return picture_cache[key]

    n_pages = max(1, -(-len(night.uploads) // page_size))
    errors = pages.errors_html(night)
    written = []
    for page in range(1, n_pages + 1):
        start = (page - 1) * page_size
        text = pages.night_html(night, page, n_pages, night.uploads[start:start + page_size], start,
                                photo_thumb, picture_thumb, errors)
        written.append(storage.write_bytes_atomic(pages.night_page(night, page), text.encode()))
    stops = pages.pair_stops(night, page_size)
    for position, stop in enumerate(stops):
        text = pages.pair_html(night, stops, position, photo_thumb,
                               lambda card: picture_png(card) if picture_thumb(card) else None)
        written.append(storage.write_bytes_atomic(pages.pair_page(night, stop.number, stop.card), text.encode()))
    return written
