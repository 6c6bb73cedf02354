"""Shared flow plumbing: run ids, batching, summaries, the runs table."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

from infra.tables import write_table
from tasks.explain import BatchSummary, PairItem, RunSettings, explain_batch_task


@dataclass
class FlowSummary:
    run_id: str
    model_id: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: wall time of the explain fan-out (submit to last result), for overhead measurements
    explain_seconds: float = 0.0
    irm: dict[str, float] = field(default_factory=dict)
    workers: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, batch: BatchSummary) -> None:
        self.done += batch.done
        self.skipped += batch.skipped
        self.failed += batch.failed
        self.irm.update(batch.irm)
        self.workers.add(batch.worker)
        for stage, seconds in batch.seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "model_id": self.model_id, "done": self.done, "skipped": self.skipped,
                "failed": self.failed, "seconds": round(self.seconds, 3),
                "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
                "explain_seconds": round(self.explain_seconds, 3)}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def explain_items(items: Sequence[PairItem], settings: RunSettings, batch_pairs: int, summary: FlowSummary,
                  annotations: dict, progress: Callable[[int, int], None] | None = None) -> None:
    """Fan batches out on the flow's task runner; gather small summaries."""
    import dask

    started = time.perf_counter()
    batches = chunks(list(items), batch_pairs)
    with dask.annotate(**annotations) if annotations else contextlib.nullcontext():
        futures = [explain_batch_task.submit(batch, settings) for batch in batches]
    done = 0
    for future, batch in zip(futures, batches):
        summary.add(future.result())
        done += len(batch)
        if progress:
            progress(done, len(items))
    summary.explain_seconds += time.perf_counter() - started


def write_run(out: str, flow: str, config, summary: FlowSummary, started: datetime, storage_options) -> None:
    finished = datetime.now(timezone.utc)
    summary.seconds = (finished - started).total_seconds()
    parameters = config.model_dump(mode="json")
    parameters.pop("storage_options", None)  # may hold credentials
    write_table(out, "runs", [{
        "run_id": summary.run_id, "flow": flow, "parameters": json.dumps(parameters, sort_keys=True),
        "n_done": summary.done, "n_skipped": summary.skipped, "n_failed": summary.failed,
        "duration_s": summary.seconds, "started_at": started, "finished_at": finished,
    }], summary.model_id, summary.run_id, storage_options)


def settings_for(config, run_id: str) -> RunSettings:
    return RunSettings(out=config.out, model=config.model, layers=tuple(config.layers), run_id=run_id,
                       k_lines=config.k_lines, k_colors=config.k_colors, device=config.device,
                       storage_options=config.storage_options or None, render=config.render,
                       public_url=getattr(config, "public_url", None))
