"""What a command prints: the progress bar, the run summary (with the failed items), the phase clock."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Iterator

import typer


@contextlib.contextmanager
def progress_display(enabled: bool) -> Iterator[None]:
    """A progress bar on stderr (TTY only) fed by the flows' progress notifications.

    Log handlers that write to stderr are pointed at the bar's console while it runs, so that log
    lines appear above the bar instead of over it.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from .outcome import listen

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  disable=not (enabled and sys.stderr.isatty()), redirect_stderr=True) as bar:
        task_id = bar.add_task("starting", total=None, rate="")
        started = time.perf_counter()

        def update(summary) -> None:
            phase, finished, planned = progress_units(summary)
            rate = summary.done / max(time.perf_counter() - started, 1e-9)
            bar.update(task_id, description=phase, completed=finished, total=planned,
                       rate=f"{rate:.2f} pairs/s" if summary.done else "")

        moved = _point_log_handlers(sys.stderr)
        try:
            with listen(update):
                yield
        finally:
            for handler, stream in moved:
                handler.setStream(stream)


#: phases of a run's work in the order they run, as the progress bar names them
PHASE_NAMES = {"embed": "embedding", "stage1": "re-ranking", "explain": "pairs"}


def progress_units(summary) -> tuple[str, int, int | None]:
    """``(phase now, finished units, planned units)`` over every phase of the run's work.

    Embedding (images), stage-1 re-ranking (pairs) and explaining (pairs) all count, so the bar
    moves (and its ETA appears) from the first finished batch of any phase; the total grows as
    later phases are planned. ``planned`` is None before any phase is planned.
    """
    progress = getattr(summary, "progress", None) or {}
    if not progress:
        planned = summary.planned.get("pairs_planned")
        return ("pairs" if planned is not None else "preparing"), summary.done + summary.failed, planned
    finished = sum(done for done, _ in progress.values())
    planned = sum(total for _, total in progress.values())
    current = next((name for name, (done, total) in progress.items() if done < total), list(progress)[-1])
    return PHASE_NAMES.get(current, current), finished, planned


def _point_log_handlers(stream) -> list[tuple[logging.StreamHandler, object]]:
    moved = []
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.__stderr__:
                moved.append((handler, handler.setStream(stream)))
    return moved


#: failed items listed at the end of a run (all of them are in the errors table)
FAILED_ITEMS_SHOWN = 10


def failed_items(config, run_id: str) -> list[dict]:
    """The first :data:`FAILED_ITEMS_SHOWN` ``errors`` rows of a run (item, stage, error type, message)."""
    from infra.tables import read_table

    try:
        errors = read_table(config.out, "errors", [("run_id", "==", run_id)],
                            columns=["item", "stage", "error_type", "message"],
                            storage_options=config.storage_options or None)
    except Exception as error:  # noqa: BLE001 - the summary still points at the table
        logging.getLogger("pairx.cli").debug("could not read the errors table: %s", error)
        return []
    return [{k: (None if v != v else v) for k, v in row.items()}
            for row in errors.head(FAILED_ITEMS_SHOWN).to_dict("records")]


def human_summary(flow: str, summary: dict, out: str) -> str:
    done, skipped, failed = summary.get("done", 0), summary.get("skipped", 0), summary.get("failed", 0)
    seconds = summary.get("seconds") or 0.0
    rate = f" ({done / seconds:.2f} pairs/s)" if done and seconds else ""
    from infra.storage import OutputLayout

    layout = OutputLayout(out)
    lines = [f"{flow} {summary.get('status', 'completed')}: {done} explained, {skipped} skipped, {failed} failed "
             f"in {seconds:.1f} s{rate}; run {summary.get('run_id')}"]
    if summary.get("detections"):  # camera-trap nights: frames, detections, empty frames, failures
        lines.append(summary["detections"])
    unsupported = (summary.get("planned") or {}).get("unsupported") or {}
    if unsupported:
        lines.append("not read (unsupported files): " + ", ".join(f"{n} {suffix}" for suffix, n in
                                                                 sorted(unsupported.items())))
    if summary.get("rerank"):  # re-ranking asked for but skipped (rerank_k not above top_k)
        lines.append(f"re-ranking {summary['rerank']}")
    if summary.get("repaired_files"):
        quarantine = layout.join(OutputLayout.control_path("quarantine"))
        lines.append(f"repaired: {summary['repaired_files']} damaged table file(s) moved to {quarantine}/, "
                     "their rows recomputed")
    lines.append(f"tables: {layout.tables}   pictures: {layout.viz}")
    if summary.get("report"):
        lines.append(f"review page: {summary['report']}")
    if summary.get("dashboard"):
        lines.append(f"Dask dashboard (while the run ran): {summary['dashboard']}")
    if failed:
        lines.append(f"errors: {layout.table('errors')} (run_id = {summary.get('run_id')})")
        items = summary.get("failed_items") or []
        if items:
            lines.append(f"failed items ({len(items)} of {failed} shown):" if failed > len(items) else "failed items:")
            for item in items:
                message = " ".join(str(item.get("message") or "").split())[:160]
                lines.append(f"  {item.get('item')} [{item.get('stage')}] {item.get('error_type')}: {message}")
    return "\n".join(lines)


def print_summary(flow: str, summary: dict, clock: "PhaseClock", config, json_output: bool) -> None:
    summary["startup"] = clock.phases(flow_seconds=summary.get("seconds"))
    typer.echo(json.dumps(summary, indent=2) if json_output else human_summary(flow, summary, config.out))


class PhaseClock:
    """Wall seconds of a command's phases, from the process start (imports included).

    ``phases()``: imports (process start to the first mark), then each marked phase; with the
    flow's own seconds, ``flow`` is split into ``flow_run`` (the flow's own work) and ``flow_overhead``.
    """

    def __init__(self) -> None:
        import psutil

        self.started = psutil.Process().create_time()
        self.marks: list[tuple[str, float]] = [("imports", time.time())]

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def phases(self, flow_seconds: float | None = None) -> dict[str, float]:
        result, previous = {}, self.started
        for name, stamp in self.marks:
            result[name] = round(stamp - previous, 2)
            previous = stamp
        if flow_seconds is not None and "flow" in result:
            result["flow_overhead"] = round(result["flow"] - flow_seconds, 2)
        result["total"] = round(previous - self.started, 2)
        return result
