"""What a night will work on, decided from listings and tables, and the quiet night's short path.

:func:`plan_uploads` lists uploads and gallery and drops what earlier nights did (a ``candidates``
row for the model with the upload's name and content) or quarantined (an upload or gallery image
whose current content failed to decode). The entry
flow calls it before any cluster starts.

A night with nothing new costs listings and one table read, but starting Prefect's temporary
server and building the model cost several seconds each. So the CLI, when it would start that
server (no ``PREFECT_API_URL``), first asks :func:`check_quiet_night`: with the model's facts
remembered from an earlier run on the same output (:func:`remember_model`, keyed by the spec,
the layers, the weights files' size and modification time and the library versions) it plans the
night here; if nothing is new it writes the night's ``runs`` row (status ``completed``, every
upload skipped) and returns the summary, without Prefect, torch or a cluster. Anything else
(work to do, a model it has not seen, weights it cannot stat) takes the normal path; a night
with work keeps its plan (:class:`EarlyNight`), which the run reuses once it holds the output's
lease if the tables the plan read are unchanged (:func:`reuse_early_night`): one plan per run.

Nothing here imports Prefect, Dask or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from infra.detections import DetectorSelection, detection_id, read_detections
from infra.images import content_hash
from infra.inputs import list_uploads_counted
from infra.night_items import DECIDED, NightItem, gallery_source, latest_verdicts, whole_items
from infra.storage import OutputLayout, StorageTarget
from infra.tables import ensure_table, read_table, write_table
from infra.verify import needs_repair
from pairx_core import ENGINE_VERSION
from pairx_core.errors import StorageError
from pairx_core.specs import weights_files

from .preflight import ModelPlan
from .run_record import FlowSummary, new_run_id, write_run

logger = logging.getLogger("pairx.flows")

#: where remembered model facts live, relative to the output
MODELS_FILE = OutputLayout.control_path("models.json")


@dataclass
class NightPlan:
    """What tonight will work on, decided before any cluster starts.

    ``gallery`` holds the usable gallery images only: those whose current content failed to
    load on an earlier night are in ``quarantined_gallery`` instead (until ``retry_failed``).
    """

    model: ModelPlan
    #: gallery item name -> individual
    gallery: dict[str, str]
    #: upload item names (URLs for whole photos; one per kept detection on a camera-trap night)
    uploads: list[str]
    new_uploads: list[str]
    quarantined: set[str]
    quarantined_gallery: set[str] = field(default_factory=set)
    #: files of the uploads folder that are not read, by suffix (HEIC, sidecars, ...)
    unsupported: dict[str, int] = field(default_factory=dict)
    #: every upload and gallery item by name (what each name stands for: photo, box, detection)
    items: dict[str, NightItem] = field(default_factory=dict)
    #: the detections of a camera-trap night (``--detections``), else None
    detector: DetectorSelection | None = None

    def item(self, name: str) -> NightItem:
        """The item called ``name`` (a whole photo when the plan does not list it)."""
        return self.items.get(name) or NightItem(name)

    @property
    def has_work(self) -> bool:
        return bool(self.new_uploads and self.gallery)

    def counts(self, top_k: int) -> dict:
        counts = {"uploads": len(self.uploads), "new_uploads": len(self.new_uploads), "gallery": len(self.gallery),
                  "pairs_planned": len(self.new_uploads) * min(top_k, len(self.gallery))}
        if self.unsupported:
            counts["unsupported"] = dict(self.unsupported)
        if self.detector is not None:
            frames = self.detector.counts
            counts["frames"] = {"n_frames": frames.n_frames, "n_empty": frames.n_empty,
                                "n_detections": frames.n_detections, "n_failures": frames.n_failures}
            counts["detections"] = self.detector.summary
        return counts


def failed_contents(out: str, model_id: str, storage_options=None) -> dict[str, set[str]]:
    """Per image URI, the content hashes that failed to load on earlier nights.

    Quarantine is about the file's content: an ``errors`` row of stage ``load`` with the
    ``content_hash`` of bytes that could not be decoded (or were too small). An image replaced
    by a good file under the same name has another hash and is tried again; a crop or rotation
    problem of a pairs table (no content hash) never quarantines an image.
    """
    errors = read_table(out, "errors", model_id=model_id, columns=["item", "stage", "content_hash"],
                        storage_options=storage_options)
    errors = errors[(errors.stage == "load") & errors.content_hash.notna()]
    failed: dict[str, set[str]] = {}
    for item, digest in zip(errors["item"], errors["content_hash"]):
        failed.setdefault(item, set()).add(digest)
    return failed


#: files read at once to hash them (bounds the memory of a planning read)
HASH_READ_CHUNK = 32


def current_hashes(out: str, uris: list[str], storage_options=None) -> dict[str, str]:
    """Content hash of each of ``uris`` as it is now (concurrent reads, :data:`HASH_READ_CHUNK` at a time)."""
    storage = StorageTarget.from_url(out, storage_options)
    hashes = {}
    for start in range(0, len(uris), HASH_READ_CHUNK):
        chunk = uris[start:start + HASH_READ_CHUNK]
        try:
            contents = storage.read_many(chunk)
        except StorageError:  # one of them is missing: read one by one, leave out the missing ones
            contents = {}
            for uri in chunk:
                with contextlib.suppress(StorageError):
                    contents[storage.url(uri)] = storage.read_bytes(uri)
        hashes.update({u: content_hash(contents[storage.url(u)]) for u in chunk if storage.url(u) in contents})
    return hashes


def unreadable_uploads(out: str, model_id: str, uploads: list[str], storage_options=None) -> set[str]:
    """Uploads whose current content failed to decode on an earlier night (skipped tonight)."""
    failed = failed_contents(out, model_id, storage_options)
    suspects = [u for u in uploads if u in failed]
    hashes = current_hashes(out, suspects, storage_options)
    return {u for u in suspects if hashes[u] in failed[u]}


def done_contents(out: str, model_id: str, storage_options=None) -> dict[str, set[tuple[str | None, str | None]]]:
    """Per upload name, the ``(content hash, detection id)`` earlier nights ranked (hash ``None``: a
    row written before the ``query_hash`` column existed, done by name; detection id ``None``: the
    whole photo was the upload)."""
    frame = read_table(out, "candidates", model_id=model_id, columns=["query", "query_hash", "query_detection_id"],
                       storage_options=storage_options)
    done: dict[str, set[tuple[str | None, str | None]]] = {}
    for query, digest, detection in zip(frame["query"], frame["query_hash"], frame["query_detection_id"]):
        done.setdefault(query, set()).add((digest if isinstance(digest, str) else None,
                                           detection if isinstance(detection, str) else None))
    return done


def detection_items(config, storage_options=None) -> tuple[DetectorSelection, list[NightItem]]:
    """The detector file's kept detections (``config.detections``), one upload item each."""
    selection = read_detections(config.detections, config.uploads, category=config.category,
                                min_confidence=config.min_confidence, species=config.species,
                                storage_options=storage_options)
    items = [NightItem(d.uri, box=d.bbox, detection=d.index, conf=d.conf, species=d.species,
                       tag=f"detection={d.index}") for d in selection.detections]
    return selection, items


def plan_uploads(config, model: ModelPlan) -> NightPlan:
    """List uploads and gallery; drop uploads done by earlier nights and quarantined images.

    An upload is done when its (name, content) was ranked on an earlier night: new bytes under
    an old name (camera traps reuse IMG_0001.JPG) are a new upload. Deciding that reads the
    bytes of every upload whose name was done before (and of every image that failed before);
    nothing else is read.

    With ``config.detections`` the uploads are the detector file's kept detections (one item
    each, done per photo content, index and box) instead of the uploads folder's files; the
    gallery is :func:`infra.night_items.gallery_source` (folder or manifest, and the uploads
    confirmed on earlier nights unless ``config.confirmed`` is off). Uploads with a standing
    decision are not queried again.
    """
    so = config.storage_options or None
    verdicts = latest_verdicts(config.out, so)
    gallery_items = gallery_source(config.gallery, config.out, so, confirmed=getattr(config, "confirmed", False),
                                   unlabelled=config.unlabelled_gallery, allow_outside_root=config.allow_outside_root,
                                   exclude=config.out, verdicts=verdicts)
    detector = None
    if getattr(config, "detections", None):
        unsupported: dict[str, int] = {}
        detector, upload_items = detection_items(config, so)
    else:
        listing = list_uploads_counted(config.uploads, so, exclude=config.out)
        unsupported, upload_items = listing.unsupported, whole_items(listing.images)
    items = {item.name: item for item in upload_items + gallery_items}  # a gallery entry wins
    photos = list(dict.fromkeys(item.uri for item in upload_items))
    done = done_contents(config.out, model.model_id, so)
    failed = {} if config.retry_failed else failed_contents(config.out, model.model_id, so)
    to_hash = [u for u in photos if u in done or u in failed]
    to_hash += [g.uri for g in gallery_items if g.uri in failed]
    hashes = current_hashes(config.out, list(dict.fromkeys(to_hash)), so)

    def is_done(item: NightItem) -> bool:
        entries = done.get(item.uri)
        if not entries:
            return False
        if item.detection is None and (None, None) in entries:
            return True  # ranked before content hashes were recorded: done by name
        digest = hashes.get(item.uri)
        if digest is None:
            return False
        identity = None if item.detection is None else detection_id(digest, item.detection, item.box)
        return (digest, identity) in entries

    def is_quarantined(uri: str) -> bool:
        return uri in failed and hashes.get(uri) in failed[uri]

    quarantined = {u.name for u in upload_items if is_quarantined(u.uri)}
    quarantined_gallery = {g.name for g in gallery_items if is_quarantined(g.uri)}
    gallery = {g.name: g.individual for g in gallery_items if g.name not in quarantined_gallery}
    uploads = [u.name for u in upload_items]
    decided = {key for key, row in verdicts.items() if row["decision"] in DECIDED}  # not a query again

    def is_decided(item: NightItem) -> bool:
        """A decision on this photo, or this detection of it (keys: infra.decisions.decision_key)."""
        digest = hashes.get(item.uri)
        identity = None if item.detection is None or digest is None else detection_id(digest, item.detection,
                                                                                       item.box)
        return any(key in decided for key in ((item.uri, digest, identity), (item.uri, None, identity)))

    new_uploads = [u.name for u in upload_items
                   if not is_done(u) and u.name not in gallery and u.name not in quarantined and not is_decided(u)]
    return NightPlan(model, gallery, uploads, new_uploads, quarantined, quarantined_gallery, unsupported,
                     items, detector)


def detector_failure_rows(config, night: NightPlan, run_id: str) -> list[dict]:
    """``errors`` rows (stage ``detector``) for the photos the detector could not read, each
    failure once per output (an earlier night's identical row is not written again)."""
    if night.detector is None or not night.detector.failures:
        return []
    so = config.storage_options or None
    known = read_table(config.out, "errors", model_id=night.model.model_id, columns=["item", "stage", "message"],
                       storage_options=so)
    known = known[known.stage == "detector"]
    seen = set(zip(known["item"], known["message"]))
    now = datetime.now(timezone.utc)
    return [{"item": failure.uri, "stage": "detector", "error_type": "DetectorFailure", "message": failure.failure,
             "content_hash": None, "run_id": run_id, "created_at": now}
            for failure in night.detector.failures if (failure.uri, failure.failure) not in seen]


def record_detector_failures(config, night: NightPlan, run_id: str) -> None:
    """Write :func:`detector_failure_rows` (nothing when there are none)."""
    rows = detector_failure_rows(config, night, run_id)
    if rows:
        write_table(config.out, "errors", rows, night.model.model_id, run_id, config.storage_options or None)


def warn_quarantined(night: NightPlan) -> None:
    """One WARNING per kind of image skipped because its content failed to load before, and one
    for the files of the uploads folder that are not read."""
    if night.unsupported:
        logger.warning("%d file(s) in the uploads folder are not supported photos and were not read: %s",
                       sum(night.unsupported.values()),
                       ", ".join(f"{suffix or '(no suffix)'} {n}" for suffix, n in night.unsupported.items()))
    for what, images in (("upload", night.quarantined), ("gallery image", night.quarantined_gallery)):
        if images:
            logger.warning("skipping %d %s(s) whose content failed to load on an earlier night (see the errors "
                           "table; --retry-failed tries them again): %s", len(images), what, sorted(images)[:5])


# ------------------------------------------------------------------------ remembered model facts
def model_key(config) -> str | None:
    """What decides a run's model facts, as a digest; ``None`` when the weights are not local files."""
    files = weights_files(config.model)
    if files is None:
        return None
    try:
        stats = [(str(path.resolve()), *_size_and_mtime(path)) for path in files]
    except OSError:
        return None
    versions = {name: _version(name) for name in ("pairx-pipeline", "torch", "timm", "zennit")}
    identity = {"spec": config.model, "layers": list(config.layers or []), "files": stats,
                "versions": versions, "engine": ENGINE_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _size_and_mtime(path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _read_models(config) -> dict:
    storage = StorageTarget.from_url(config.out, config.storage_options or None)
    try:
        if not storage.exists(MODELS_FILE):
            return {}
        remembered = json.loads(storage.read_bytes(MODELS_FILE))
    except (OSError, ValueError) as error:
        logger.debug("remembered model facts unreadable (%s); resolving the model", error)
        return {}
    return remembered if isinstance(remembered, dict) else {}


def remembered_model(config) -> ModelPlan | None:
    """The model facts an earlier run on this output resolved for the same model, if any."""
    key = model_key(config)
    entry = _read_models(config).get(key) if key else None
    if not isinstance(entry, dict):
        return None
    try:
        return ModelPlan(str(entry["model_id"]), tuple(entry["layers"]), dict(entry["facts"]))
    except (KeyError, TypeError):
        return None


def remember_model(config, model: ModelPlan) -> None:
    """Keep ``model``'s facts for later runs on this output (best effort: a failure only costs
    the next quiet night its short path)."""
    key = model_key(config)
    if key is None:
        return
    try:
        remembered = _read_models(config)
        remembered[key] = {"model_id": model.model_id, "layers": list(model.layers), "facts": model.facts}
        storage = StorageTarget.from_url(config.out, config.storage_options or None)
        storage.write_bytes_atomic(MODELS_FILE, json.dumps(remembered, indent=1, sort_keys=True).encode())
    except Exception as error:  # noqa: BLE001 - an optimisation only
        logger.debug("could not remember the model's facts: %s", error)


# ------------------------------------------------------------------------------ the quiet night
#: the tables :func:`plan_uploads` reads to decide what is done, quarantined or decided
PLANNING_TABLES = ("candidates", "errors", "decisions")


def planning_tables_state(config) -> tuple[str, ...]:
    """The files of the tables a night's plan reads: any write, compaction or repair changes it."""
    storage = StorageTarget.from_url(config.out, config.storage_options or None)
    return tuple(url for name in PLANNING_TABLES
                 for url in storage.list_files(OutputLayout.table_path(name), suffixes=[".parquet"]))


@dataclass(frozen=True)
class EarlyNight:
    """A night planned before its run took the output's lease, and the tables it was planned from."""

    night: NightPlan
    tables: tuple[str, ...]


def reuse_early_night(early: EarlyNight, config, model: ModelPlan) -> NightPlan | None:
    """``early``'s plan when it still holds (call it holding the lease): made for ``model``, and no
    run wrote, compacted or repaired the tables it read since; ``None``: plan again."""
    if early.night.model != model:
        return None
    try:
        unchanged = planning_tables_state(config) == early.tables
    except StorageError as error:
        logger.debug("planning the night again (tables not listed: %s)", error)
        return None
    return early.night if unchanged else None


@dataclass(frozen=True)
class QuietCheck:
    """What :func:`check_quiet_night` found: the quiet night's summary (recorded), else the night
    it planned for a remembered model (``None`` when it planned nothing), for the run to reuse."""

    summary: dict | None = None
    early: EarlyNight | None = None


def record_quiet_night(config) -> dict | None:
    """If tonight has nothing new for a remembered model, record it and return its summary.

    Returns ``None`` (nothing written) when the model is not remembered or there is work.
    """
    return check_quiet_night(config).summary


def check_quiet_night(config) -> QuietCheck:
    """:func:`record_quiet_night`, keeping the plan of a night with work for its run."""
    model = remembered_model(config)
    if model is None or (model.facts.get("random_weights") and not config.allow_random_weights):
        return QuietCheck()  # unknown here, or to be refused by the normal path's checks
    if needs_repair(config.out, config.storage_options or None):
        return QuietCheck()  # damaged tables: the normal path moves them aside and recomputes what they held
    started = datetime.now(timezone.utc)
    tables = planning_tables_state(config)
    night = plan_uploads(config, model)
    if night.has_work:
        return QuietCheck(early=EarlyNight(night, tables))
    summary = FlowSummary(run_id=new_run_id(), model_id=model.model_id, model_facts=model.facts)
    summary.skipped = len(night.uploads) - len(night.new_uploads)
    summary.planned = {**night.counts(config.top_k), "short_path": "nothing new: recorded without Prefect"}
    summary.status = "completed"
    summary.seconds = (datetime.now(timezone.utc) - started).total_seconds()
    so = config.storage_options or None
    write_run(config.out, "nightly", config, summary, started)
    record_detector_failures(config, night, summary.run_id)
    ensure_table(config.out, "errors", summary.model_id, summary.run_id, so)
    warn_quarantined(night)
    return QuietCheck(summary=summary.as_dict())
