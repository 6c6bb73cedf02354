"""Shared flow plumbing: the recorded run around every flow, batching, summaries, the runs table.

Every flow has two parts:

- the *entry flow* (``nightly``, ``explain_pairs``, ``reprocess``): what the CLI calls and what a
  deployment's entrypoint names. It builds the Dask task runner from the config
  (:func:`task_runner_for`, the one place that decides it), runs the work flow on it as a
  subflow, and records the run whatever happens (:func:`run_recorded`);
- the *work flow* (``nightly-work``, ...): the fan-out itself, on that runner.

Outcome (see the README's "Operations"): a run whose items all succeeded is ``Completed``; a run
with failed items ends ``Failed`` with :class:`ItemsFailedError` (counts and where the errors
are); an exception, Ctrl-C or SIGTERM ends it ``Crashed``/``Cancelled``. In every case a ``runs``
row is written with ``status`` completed / failed / crashed / cancelled / refused (another run
held the output's lease for longer than ``lease_wait_s``) and the counts so far.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Sequence

from infra.cluster import make_task_runner
from infra.decoded_photos import clear_decoded_photos
from infra.lease import OutputLockedError, output_lease
from infra.storage import OutputLayout, counting_retries, is_url
from infra.tables import count_run_rows, ensure_table, table_url
from infra.verify import repair_tables
from tasks.explain import PairItem, RunSettings, explain_batch_task

from . import run_context
from .outcome import ItemsFailedError, RunAborted, RunTerminated, listen, notify  # noqa: F401 - re-exported
from .run_record import UNRESOLVED_MODEL, FlowSummary, chunks, new_run_id, write_run  # noqa: F401 - re-exported

logger = logging.getLogger("pairx.flows")

def task_runner_for(config):
    """The Dask task runner a config asks for: ``cluster`` address, else a LocalCluster of ``workers``."""
    return make_task_runner(config.cluster, config.workers, config.device)


# ------------------------------------------------------------------------------ active runs
def active_summary(run_id: str) -> FlowSummary:
    """The summary of run ``run_id`` in progress in this process (the work flow adds to it)."""
    return run_context.for_run(run_id).summary


def _status_of(error: BaseException) -> str:
    from prefect.exceptions import TerminationSignal

    if isinstance(error, RunAborted):
        return "crashed"
    if isinstance(error, (KeyboardInterrupt, TerminationSignal)):
        return "cancelled"
    if isinstance(error, OutputLockedError):
        return "refused"
    return "crashed"


def _describe(error: BaseException) -> str:
    """``Type: message`` of what stopped a run; signals by name (SIGTERM), Ctrl-C as such."""
    import signal as signals

    number = getattr(error, "signal", None)
    if isinstance(number, int):
        try:
            return f"{type(error).__name__}: {signals.Signals(number).name}"
        except ValueError:
            pass
    if type(error) is KeyboardInterrupt:
        return "KeyboardInterrupt: Ctrl-C"
    from infra.redaction import redact_text

    return redact_text(f"{type(error).__name__}: {error}")[:2000]


def run_recorded(flow_name: str, config, work_flow, prepare=None) -> dict:
    """Run ``work_flow(config, run_id)`` on the config's task runner and record the run.

    ``prepare(config, summary) -> bool``, when given, runs first in this process and says whether
    there is work at all: without work no task runner (no Dask cluster) is started. The ``runs``
    row (and the run-summary artifact) is written whatever happens, once; a forced exit on a
    second SIGTERM (``flows.stopping``) writes it as ``cancelled`` and releases the lease. Raises
    :class:`ItemsFailedError` when items failed, and re-raises whatever stopped the run.
    """
    from .stopping import stop_hook

    started = datetime.now(timezone.utc)
    summary = FlowSummary(run_id=new_run_id())
    recorder = _RunRecorder(flow_name, config, summary, started)
    context = run_context.current()
    if context is None or context.run_id is not None:  # a deployment, or no entry made one for this run
        context = run_context.RunContext(flow_name)
    context.run_id, context.summary = summary.run_id, summary
    try:
        with run_context.bound(context), stop_hook(recorder.forced_stop), output_lease(
                config.out, summary.run_id, flow_name, wait_s=config.lease_wait_s,
                storage_options=config.storage_options or None) as lease:
            recorder.lease = lease
            summary.repaired_files = len(repair_tables(config.out, config.storage_options or None))
            if prepare is None or prepare(config, summary):
                work_flow.with_options(task_runner=task_runner_for(config))(config, summary.run_id)
            summary.status = "failed" if summary.failed else "completed"
            _review_page(config, summary, started)
    except BaseException as error:
        summary.status = _status_of(error)
        summary.error = _describe(error)
        _count_written_pairs(config, summary)
        raise
    finally:
        context.night = context.early_night = None  # the plans are this run's only
        clear_decoded_photos()  # this process's decodes of the run's photos (infra.decoded_photos)
        recorder.record()
        notify(summary)
    result = summary.as_dict()
    if summary.failed:
        raise ItemsFailedError(result, table_url(config.out, "errors"))
    return result


class _RunRecorder:
    """Writes a run's record once, from the flow's ``finally`` or from a forced exit's hook."""

    def __init__(self, flow_name: str, config, summary: FlowSummary, started: datetime):
        self.flow_name, self.config, self.summary, self.started = flow_name, config, summary, started
        self.lease = None
        self._lock = threading.Lock()
        self._recorded = False
        self._counting = contextlib.ExitStack()  # storage retries, counted until the row is written
        summary.retries = self._counting.enter_context(counting_retries())

    def record(self) -> None:
        with self._lock:
            if self._recorded:
                return
            self._recorded = True
            self.summary.seconds = (datetime.now(timezone.utc) - self.started).total_seconds()
            self._counting.close()
            _record(self.flow_name, self.config, self.summary, self.started)

    def forced_stop(self, status: str, error: str) -> None:
        """The process leaves now (second signal, or the grace time ran out): row, then lease."""
        if self._lock.acquire(timeout=2.0):  # a row being written in the main thread is let finish
            self._lock.release()
        if not self._recorded:
            self.summary.status, self.summary.error = status, error
            _count_written_pairs(self.config, self.summary)
            self.record()
        if self.lease is not None:
            self.lease.release()


def _count_written_pairs(config, summary: FlowSummary) -> None:
    """A run that stopped early counts the pairs its batches wrote, gathered by the flow or not."""
    if summary.model_id == UNRESOLVED_MODEL:
        return
    try:
        written = count_run_rows(config.out, "pairs", summary.model_id, summary.run_id,
                                 config.storage_options or None)
    except Exception as error:  # noqa: BLE001 - the counts gathered so far are still recorded
        logger.warning("could not count the pairs this run wrote: %s", error)
        return
    summary.done = max(summary.done, written)


def _review_page(config, summary: FlowSummary, started: datetime) -> None:
    """Write or update the night's pages of the review site; a failure is logged, not fatal."""
    if not config.report or not (summary.done or summary.failed):
        return  # nothing new was written: the site is current
    from tasks.report import write_report_task

    try:
        summary.planned["report"] = write_report_task(
            config.out, started.date().isoformat(), summary.model_id, public_url=config.public_url,
            storage_options=config.storage_options or None)
    except Exception as error:  # noqa: BLE001 - the tables are the record; the site can be rebuilt
        logger.warning("could not write the review site (rebuild it with `pairx report %s`): %s", config.out, error)


def _record(flow_name: str, config, summary: FlowSummary, started: datetime) -> None:
    """Runs row, an errors table that always exists, the markdown artifact: best effort each."""
    steps = (
        ("runs row", lambda: write_run(config.out, flow_name, config, summary, started)),
        ("errors table", lambda: ensure_table(config.out, "errors", summary.model_id, summary.run_id,
                                               config.storage_options or None)),
        ("summary artifact", lambda: _artifact(flow_name, config, summary)),
    )
    for what, step in steps:
        try:
            step()
        except Exception as error:  # noqa: BLE001 - never hide the run's own outcome behind this
            logger.warning("could not write the %s of run %s: %s", what, summary.run_id, error)


def explain_items(items: Sequence[PairItem], settings: RunSettings, batch_pairs: int, summary: FlowSummary,
                  annotations: dict) -> None:
    """Fan batches out on the flow's task runner; gather small summaries as they finish."""
    import dask
    from prefect.futures import as_completed

    started = time.perf_counter()
    batches = chunks(list(items), batch_pairs)
    dashboard = dask_dashboard_link()
    if dashboard:
        summary.planned.setdefault("dashboard", dashboard)
    futures: list = []
    summary.advance("explain", more_planned=len(items))  # a re-ranked night explains in two rounds
    try:
        with dask.annotate(**annotations) if annotations else contextlib.nullcontext():
            for batch in batches:
                futures.append(explain_batch_task.submit(batch, settings))
        for future in as_completed(futures):
            result = future.result()
            summary.add(result)
            summary.advance("explain", result.done + result.skipped + result.failed)
            notify(summary)
    except BaseException:
        cancel_pending(futures)
        raise
    summary.explain_seconds += time.perf_counter() - started


def dask_dashboard_link() -> str | None:
    """The Dask dashboard of the running flow's task runner (``None`` without a Dask cluster)."""
    try:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        client = getattr(getattr(context, "task_runner", None), "_client", None)
        return getattr(client, "dashboard_link", None) or None
    except Exception:  # noqa: BLE001 - a missing link never fails a run
        return None


def cancel_pending(futures) -> int:
    """Cancel the submitted task runs that have not finished (a stopped run); returns how many."""
    cancelled = 0
    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        try:
            if wrapped is not None and not wrapped.done():
                wrapped.cancel()
                cancelled += 1
        except Exception:  # noqa: BLE001 - a client already closed: nothing left to cancel
            pass
    if cancelled:
        logger.info("cancelled %d task run(s) not yet finished", cancelled)
    return cancelled


def summary_markdown(flow_name: str, config, summary: FlowSummary, top_candidates: list[dict] | None = None) -> str:
    """The run summary a person reads in Prefect's UI (no credentials: storage options left out)."""
    review = summary.planned.get("report") or _public_report_url(config)
    rows = [("status", summary.status), ("run id", summary.run_id), ("model", summary.model_id),
            ("done", summary.done), ("skipped", summary.skipped), ("failed", summary.failed),
            ("seconds", f"{summary.seconds:.1f}"),
            *((f"{stage} s", f"{sec:.1f}") for stage, sec in sorted(summary.stage_seconds.items())),
            ("tables", OutputLayout(config.out).tables), ("pictures", OutputLayout(config.out).viz),
            ("review page", f"[{review}]({review})" if is_url(review) else review)]
    if summary.planned.get("dashboard"):
        rows.append(("Dask dashboard", f"[{summary.planned['dashboard']}]({summary.planned['dashboard']})"))
    if summary.failed:
        rows.append(("errors", f"{OutputLayout(config.out).table('errors')} (run_id = {summary.run_id})"))
    if summary.error:
        rows.append(("error", summary.error.replace("|", "\\|").replace("\n", " ")[:500]))
    lines = [f"# pairx {flow_name}: {summary.status}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    if top_candidates:
        lines += ["", f"## Tonight's uploads and their top candidate ({len(top_candidates)})", "",
                  "| upload | top candidate | individual | score |", "|---|---|---|---|"]
        lines += [f"| {_cell(c['query'])} | {_cell(c['gallery_image'])} | {_cell(c.get('individual') or '-')} | "
                  f"{c['score']:.3f} |" for c in top_candidates]
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _public_report_url(config) -> str:
    public = getattr(config, "public_url", None)
    return OutputLayout(public or config.out).join(OutputLayout.REPORT, "index.html")


#: uploads listed in the run artifact (the candidates table holds all of them)
ARTIFACT_UPLOADS_SHOWN = 50


def top_candidates(config, summary: FlowSummary) -> list[dict]:
    """This run's uploads with their rank-1 candidate (first :data:`ARTIFACT_UPLOADS_SHOWN`)."""
    from infra.tables import read_table

    try:
        rows = read_table(config.out, "candidates", [("run_id", "==", summary.run_id), ("rank", "==", 1)],
                          model_id=summary.model_id, storage_options=config.storage_options or None)
    except Exception as error:  # noqa: BLE001 - the artifact is a convenience
        logger.debug("no candidates for the artifact: %s", error)
        return []
    if rows.empty:
        return []
    score = rows["rerank_score"].where(rows["rerank_score"].notna(), rows["similarity"])
    rows = rows.assign(score=score.astype(float)).sort_values("query").head(ARTIFACT_UPLOADS_SHOWN)
    return rows[["query", "gallery_image", "individual", "score"]].to_dict("records")


def _artifact(flow_name: str, config, summary: FlowSummary) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    top = top_candidates(config, summary) if flow_name == "nightly" else []
    create_markdown_artifact(markdown=summary_markdown(flow_name, config, summary, top),
                             key=f"pairx-{flow_name.replace('_', '-')}-summary",
                             description=f"pairx {flow_name} run {summary.run_id}")


def settings_for(config, run_id: str, layers: Sequence[str]) -> RunSettings:
    return RunSettings(out=config.out, model=config.model, layers=tuple(layers), run_id=run_id,
                       k_lines=config.k_lines, k_colors=config.k_colors, device=config.device,
                       storage_options=config.storage_options or None, render=config.render,
                       public_url=getattr(config, "public_url", None),
                       render_in_background=config.render_in_background)
