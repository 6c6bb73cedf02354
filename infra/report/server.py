"""``pairx review OUT``: the review site served with decision controls, and the decisions API.

- ``GET /`` redirects to ``/report/index.html``. ``GET /report/...`` and ``GET /viz/...`` serve the
  static site and the PAIR-X pictures from OUT (only those two folders; each path segment must be
  a plain name, as the site's own links are). HTML pages get one extra ``<script>``
  (``/_review/review.js``, plain JavaScript in ``static/``) that adds the decision controls;
  without the server the pages stay read-only.
- ``GET /api/night?slug=<night folder>``: the uploads of a night page in page order (a photo, or
  one detection in it: ``detection_id``), with the night run and candidates each decision refers to.
- ``GET /api/decisions?night=RUN_ID``: the decisions on that night's uploads (every row, oldest
  first, and ``latest``: the latest row per upload, a list); without ``night``: all.
- ``POST /api/decisions``: one decision (JSON; fields of :class:`infra.decisions.DecisionRequest`;
  ``detection_id`` or ``box`` names one detection of a camera-trap frame).
  400 malformed, 401 token missing or wrong, 404 unknown upload or detection, 409 another OUT / a model or
  night that did not rank the upload / nothing to undo, 415 not JSON. 200 once the decision is in
  the journal (durable); the journal goes to the ``decisions`` table in batches.

Safety: binds 127.0.0.1 unless told otherwise, and any other host needs a token, which every
write must then carry (``Authorization: Bearer <token>``). A POST whose ``Origin`` is not this
server is refused (403), so another web page cannot write through the reviewer's browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import mimetypes
import re
import threading
import urllib.parse
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pairx_core.errors import ConfigError

from ..decision_journal import DecisionJournal
from ..decisions import (DecisionError, DecisionRequest, UploadIndex, decision_key, latest_by_upload, plain_value,
                         read_decisions, resolve_decision, row_dicts)
from ..storage import OutputLayout, StorageTarget
from . import refresh_index
from .data import load_nights

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ReviewState", "check_binding", "create_app", "journal_folder", "serve"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "PAIRX_REVIEW_TOKEN"
SCRIPT_PATH = "/_review/review.js"
STATIC_DIR = Path(__file__).with_name("static")
#: a path segment the site's own links use (no "..", no hidden names)
_SEGMENT = re.compile(r"[A-Za-z0-9_=~-][A-Za-z0-9._=~-]*")
_MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} is reachable from other machines: give --token (or set {TOKEN_ENV}) "
                          "so that only reviewers who have it can write decisions")


def journal_folder(out: str) -> Path:
    """Where the server journals decisions: ``OUT/_pairx/review-journal`` (a local OUT only)."""
    target = StorageTarget.from_url(out)
    if not target.is_local:
        raise ConfigError(f"pairx review needs a local OUT (its journal is fsync-ed on local disk), got {out!r}")
    return Path(target.root) / OutputLayout.control_path("review-journal")


def _jsonable(row: Mapping[str, Any]) -> dict:
    """``row`` with JSON values: ISO timestamps, lists, None for missing numbers."""
    result = {}
    for key, value in row.items():
        if hasattr(value, "to_pydatetime"):
            value = None if value is pd.NaT else value.to_pydatetime()
        elif hasattr(value, "tolist") and getattr(value, "ndim", 0):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            value = [float(v) for v in value]
        elif isinstance(value, datetime):
            value = value.astimezone(timezone.utc).isoformat()
        elif not isinstance(value, str):
            value = plain_value(value)
        result[key] = value
    return result


class ReviewState:
    """What the server knows: the uploads (reloaded when the tables change), decisions so far, the journal."""

    def __init__(self, out: str, journal: DecisionJournal, storage_options: Mapping[str, Any] | None = None):
        self.out, self.journal, self.storage_options = out, journal, storage_options
        self.storage = StorageTarget.from_url(out, storage_options)
        self._lock = threading.Lock()  # decisions
        self._load_lock = threading.RLock()  # the upload index and nights
        self._index: UploadIndex | None = None
        self._nights: list | None = None
        self._signature: tuple | None = None
        self._rows: list[dict] = []
        self._latest: dict[tuple, dict] = {}
        self._last_time: datetime | None = None
        self._decisions_signature: tuple | None = None

    def _files(self, table: str) -> tuple[str, ...]:
        return tuple(sorted(self.storage.list_files(OutputLayout.table_path(table), suffixes=[".parquet"])))

    def load(self) -> None:
        """(Re)read the decisions: the table's rows plus those still only in the journal. Called at
        start and whenever the table's files change (this server's flushes, ``pairx decide``)."""
        signature = self._files("decisions")
        if signature == self._decisions_signature:
            return
        rows = row_dicts(read_decisions(self.out, self.storage_options))
        seen = {row["decision_id"] for row in rows}
        rows += [row for row in self.journal.unflushed() if row["decision_id"] not in seen]
        rows.sort(key=lambda row: (row["decided_at"], row["decision_id"]))
        self._rows, self._latest = rows, latest_by_upload(rows)
        self._decisions_signature = signature

    def _tables_signature(self) -> tuple:
        return tuple(self._files(name) for name in ("candidates", "pairs", "images"))

    def index(self) -> UploadIndex:
        with self._load_lock:
            signature = self._tables_signature()
            if self._index is None or signature != self._signature:
                self._index = UploadIndex.load(self.out, self.storage_options)
                self._nights = None
                self._signature = signature
            return self._index

    def night(self, slug: str) -> dict | None:
        """The uploads of night ``slug`` in page order (the page's ``section.upload`` ids are u1, u2, ...)."""
        with self._load_lock:
            index = self.index()
            if self._nights is None:
                self._nights = load_nights(self.out, storage_options=self.storage_options)
            nights = self._nights
        night = next((n for n in nights if n.slug == slug), None)
        if night is None:
            return None
        uploads = []
        for number, upload in enumerate(night.uploads, start=1):
            runs = [r for r in index.runs(upload.photo.uri) if r.model_id == night.model_id and r.date == night.date
                    and r.detection_id == upload.detection_id]
            uploads.append({
                "number": number, "query": upload.photo.uri, "detection_id": upload.detection_id,
                "detection": upload.detection,
                "night_run_id": runs[0].run_id if runs else None,
                "candidates": [{"rank": c.rank, "individual": c.individual, "gallery_image": c.photo.uri}
                               for c in upload.cards],
            })
        return {"slug": night.slug, "date": night.date, "model_id": night.model_id, "ranked": night.ranked,
                "uploads": uploads}

    def _clock(self) -> datetime:
        """Now (UTC), strictly after every decision this server recorded (orders same-instant decisions)."""
        now = datetime.now(timezone.utc)
        if self._last_time is not None and now <= self._last_time:
            now = self._last_time + timedelta(microseconds=1)
        self._last_time = now
        return now

    def decide(self, request: DecisionRequest) -> dict:
        with self._lock:
            self.load()
            row = resolve_decision(request, self.index(), self._latest, out=self.out, run_id=self.journal.run_id,
                                   decided_at=self._clock())
            self.journal.append(row)
            self._rows.append(row)
            self._latest[decision_key(row)] = row
        return row

    def decisions(self, night: str | None) -> dict:
        with self._lock:
            self.load()
            rows = [r for r in self._rows if night is None or r["night_run_id"] == night]
        latest = latest_by_upload(rows)
        return {"night": night, "decisions": [_jsonable(r) for r in rows],
                "latest": [_jsonable(r) for r in latest.values()]}


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def create_app(out: str, *, token: str | None = None, storage_options: Mapping[str, Any] | None = None,
               flush_every_s: float = 5.0, flush_rows: int = 50, journal_dir: str | Path | None = None):
    """The Starlette app of ``pairx review`` for output root ``out`` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    run_id = f"review-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    journal = DecisionJournal(journal_dir or journal_folder(out), out, run_id, storage_options, flush_rows=flush_rows)
    state = ReviewState(out, journal, storage_options)
    storage = StorageTarget.from_url(out, storage_options)
    script = (STATIC_DIR / "review.js").read_bytes()
    tag = f"<script src='{SCRIPT_PATH}' defer></script>".encode()
    stop = threading.Event()

    def flusher() -> None:
        while not stop.wait(0.25):
            if journal.due(flush_every_s):
                try:
                    flushed = journal.flush()
                except Exception:  # noqa: BLE001 - rows stay journaled; retried at the next tick
                    logger.exception("decision journal: flush failed, will retry")
                    continue
                if flushed:
                    refresh_index(out, storage_options)  # the index's review figures, as of this flush

    @asynccontextmanager
    async def lifespan(app):
        recovered = journal.open()
        if recovered:
            logger.warning("recovered %d decision(s) journaled by an earlier server", recovered)
        state.load()
        thread = threading.Thread(target=flusher, name="decision-flusher", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            journal.close()

    def site_file(request: Request) -> Response:
        path = request.url.path.lstrip("/")
        segments = path.split("/")
        served = segments[0] in (OutputLayout.REPORT, OutputLayout.VIZ)
        if not served or not all(_SEGMENT.fullmatch(s) for s in segments[1:]) or len(segments) < 2:
            return _error(404, "not found")
        relative = "/".join(segments)
        try:
            data = storage.read_bytes(relative)
        except Exception:  # noqa: BLE001 - a missing file, a folder: 404
            return _error(404, "not found")
        media = mimetypes.guess_type(relative)[0] or "application/octet-stream"
        if media == "text/html":
            at = data.rfind(b"</body>")
            data = data[:at] + tag + data[at:] if at >= 0 else data + tag
        return Response(data, media_type=media, headers={"Cache-Control": "no-store"})

    def root(request: Request) -> Response:
        return RedirectResponse(f"/{OutputLayout.REPORT}/index.html")

    def review_js(request: Request) -> Response:
        return Response(script, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    def night_info(request: Request) -> Response:
        slug = request.query_params.get("slug", "")
        if not _SEGMENT.fullmatch(slug):
            return _error(400, "slug: a night folder name is required")
        info = state.night(slug)
        return _error(404, f"unknown night {slug!r}") if info is None else JSONResponse(info)

    async def decisions(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        if request.method == "GET":
            night = request.query_params.get("night")
            if night is not None and (not night or len(night) > 200):
                return _error(400, "night: a run id is required")
            return JSONResponse(await run_in_threadpool(state.decisions, night))
        if token:
            given = request.headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-pairx-token", "")
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "this server needs its token: Authorization: Bearer <token>")
        origin = request.headers.get("origin")
        if origin and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, f"writes from {origin} are refused")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(415, "send the decision as application/json")
        body = await request.body()
        if len(body) > _MAX_BODY:
            return _error(400, "request body too large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"malformed JSON: {error}")
        try:
            decision = DecisionRequest.from_mapping(data)
            row = await run_in_threadpool(state.decide, decision)
        except DecisionError as error:
            return _error(error.status, str(error))
        return JSONResponse({"decision": _jsonable(row)})

    routes = [
        Route("/", root),
        Route(SCRIPT_PATH, review_js),
        Route("/api/night", night_info),
        Route("/api/decisions", decisions, methods=["GET", "POST"]),
        Route(f"/{OutputLayout.REPORT}/{{path:path}}", site_file),
        Route(f"/{OutputLayout.VIZ}/{{path:path}}", site_file),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.review = state
    return app


def serve(out: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, *,
          storage_options: Mapping[str, Any] | None = None, flush_every_s: float = 5.0, flush_rows: int = 50) -> None:
    """Run the review server until interrupted (flushes the journal on the way out)."""
    import uvicorn

    check_binding(host, token)
    app = create_app(out, token=token, storage_options=storage_options, flush_every_s=flush_every_s,
                     flush_rows=flush_rows)
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
