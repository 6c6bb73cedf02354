"""What a run records about itself: the in-process summary and its ``runs`` row.

Light on purpose (no Prefect, Dask or torch imports): the CLI records a night with nothing new
through this module without starting any of them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from infra.records import run_row
from infra.redaction import redact_text
from infra.storage import RetryCount
from infra.tables import write_table

#: model_id partition for runs that ended before their model was known
UNRESOLVED_MODEL = "unresolved"


@dataclass
class FlowSummary:
    run_id: str
    model_id: str = UNRESOLVED_MODEL
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: wall time of the explain fan-out (submit to last result), for overhead measurements
    explain_seconds: float = 0.0
    irm: dict[str, float] = field(default_factory=dict)
    workers: set[str] = field(default_factory=set)
    status: str = "running"
    error: str | None = None
    #: what the run will do (set by the work flow as soon as it knows; drives the CLI's progress)
    planned: dict[str, Any] = field(default_factory=dict)
    #: model facts for the runs table (spec as typed without credentials, digest, random weights)
    model_facts: dict[str, Any] = field(default_factory=dict)
    #: activation cache: images found, computed, and damaged entries recomputed
    cache: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0, "damaged": 0})
    #: damaged table files moved to _pairx/quarantine/ before planning (their rows are recomputed)
    repaired_files: int = 0
    #: work units per phase as ``[finished, planned]``: ``embed`` (images), ``stage1`` (re-ranked
    #: pairs), ``explain`` (pairs); drives the CLI's progress bar and ETA
    progress: dict[str, list[int]] = field(default_factory=dict)
    #: storage retries of transient errors this process made during the run (``infra.storage.counting_retries``)
    retries: RetryCount = field(default_factory=RetryCount)

    def advance(self, phase: str, finished: int = 0, planned: int | None = None, more_planned: int = 0) -> None:
        """Count ``finished`` units of ``phase``; set its ``planned`` total when given, or add
        ``more_planned`` to it (a phase run in rounds)."""
        counts = self.progress.setdefault(phase, [0, 0])
        counts[0] += finished
        if planned is not None:
            counts[1] = planned
        counts[1] += more_planned

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, batch) -> None:
        """Add one explain batch's counts (a ``tasks.explain.BatchSummary``)."""
        self.done += batch.done
        self.skipped += batch.skipped
        self.failed += batch.failed
        self.irm.update(batch.irm)
        self.workers.add(batch.worker)
        for stage, seconds in batch.seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "model_id": self.model_id, "status": self.status, "done": self.done,
                "skipped": self.skipped, "failed": self.failed, "seconds": round(self.seconds, 3),
                "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
                "explain_seconds": round(self.explain_seconds, 3), "workers": sorted(self.workers),
                "cache": dict(self.cache), "repaired_files": self.repaired_files,
                **({"error": self.error} if self.error else {}), **self.planned}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def public_parameters(config) -> dict:
    """The config as stored in the ``runs`` table: no storage options, every value without
    credentials (model spec and URLs redacted: ``infra.redaction.redact_text``)."""
    parameters = config.model_dump(mode="json")
    parameters.pop("storage_options", None)
    return json.loads(redact_text(json.dumps(parameters)))


def write_run(out: str, flow: str, config, summary: FlowSummary, started: datetime) -> None:
    """Write the run's ``runs`` row (built by :func:`infra.records.run_row`)."""
    row = run_row(flow, public_parameters(config), summary, started, datetime.now(timezone.utc), summary.retries.count)
    write_table(out, "runs", [row], summary.model_id, summary.run_id, config.storage_options or None)
