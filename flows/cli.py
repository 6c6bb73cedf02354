"""The ``pairx`` command line: explain, nightly, reprocess (and demo).

Prefect runs against ``PREFECT_API_URL`` when it is set; otherwise the CLI starts a temporary
local Prefect server for the run (SQLite under ``PREFECT_HOME``), gives its URL to the Dask
workers, and stops it at the end. Analytics are off. Exit code 1 if any item failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Iterator, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PAIR-X explanations of animal re-identification matches, at pipeline scale.")

MODEL_HELP = "model spec: timm:<arch>?size=N, miewid?weights=URL, hf://conservationxlabs/miewid-msv2, demo, ..."


def _storage_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--storage-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key] = json.loads(value) if value[:1] in "[{" or value in ("true", "false") else value
    return options


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Use PREFECT_API_URL if set, else a temporary local server shared with the workers."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=60)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        _flush_logs()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _flush_logs() -> None:
    """Send queued flow/task logs and events before the temporary server goes away.

    Without this the log and event workers keep retrying a closed port for about a minute at
    exit and then print "Error logging to API".
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - losing the last log lines must never fail the run
            pass


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import progress as hooks

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False, disable=not sys.stderr.isatty()) as bar:
        task_id = bar.add_task(label, total=None)
        hooks.set_callback(lambda done, total: bar.update(task_id, completed=done, total=total))
        try:
            yield
        finally:
            hooks.set_callback(None)


def _finish(summary: dict) -> None:
    typer.echo(json.dumps(summary, indent=2))
    if summary.get("failed"):
        typer.echo(f"{summary['failed']} item(s) failed: see the errors table", err=True)
        raise typer.Exit(code=1)


def _common(**kwargs) -> dict:
    layers = kwargs.pop("layers")
    storage = kwargs.pop("storage_option")
    values = {k: v for k, v in kwargs.items() if v is not None}
    if layers:
        values["layers"] = [name for item in layers for name in item.split(",") if name]
    values["storage_options"] = _storage_options(storage or [])
    return values


Out = typer.Option(..., "--out", help="output root: folder or URL (s3://bucket/prefix)")
Model = typer.Option(None, "--model", help=MODEL_HELP)
Layers = typer.Option(None, "--layers", help="layer name(s), comma-separated or repeated (default backbone.blocks.3)")
KLines = typer.Option(None, "--k-lines", help="matches drawn as lines (default 20)")
KColors = typer.Option(None, "--k-colors", help="matches drawn as colour regions; 0 skips pixel relevance (default 10)")
Cache = typer.Option(None, "--cache", help="activation cache URL (default OUT/cache)")
Cluster = typer.Option(None, "--cluster", help="existing Dask scheduler, e.g. tcp://host:8786 (default: LocalCluster)")
Workers = typer.Option(None, "--workers", help="LocalCluster workers (default: one per GPU, else 1)")
BatchPairs = typer.Option(None, "--batch-pairs", help="pairs per task batch (default 8)")
Device = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)")
StorageOpt = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for every URL (repeatable)")


@app.command("explain")
def explain_cmd(
    pairs: str = typer.Argument(..., help="pairs table (CSV/Parquet) with image_0, image_1[, pair_id, box_0, box_1]"),
    out: str = Out,
    image_root: Optional[str] = typer.Option(None, "--image-root", help="prefix for relative image paths"),
    model: Optional[str] = Model, layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines,
    k_colors: Optional[int] = KColors, cache: Optional[str] = Cache, cluster: Optional[str] = Cluster,
    workers: Optional[int] = Workers, batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Explain every pair of a pairs table; write pictures and Parquet tables under OUT."""
    from .config import ExplainPairsConfig
    from .explain_pairs import run_explain_pairs

    config = ExplainPairsConfig(pairs=pairs, image_root=image_root, **_common(
        out=out, model=model, layers=layers, k_lines=k_lines, k_colors=k_colors, cache=cache, cluster=cluster,
        workers=workers, batch_pairs=batch_pairs, device=device, storage_option=storage_option))
    with prefect_api(), progress_bar("pairs"):
        summary = run_explain_pairs(config)
    _finish(summary)


@app.command("nightly")
def nightly_cmd(
    uploads: str = typer.Option(..., "--uploads", help="folder/URL of new photos (recursive)"),
    gallery: str = typer.Option(..., "--gallery", help="gallery: one folder per individual, or manifest CSV image,individual"),
    out: str = Out,
    top_k: Optional[int] = typer.Option(None, "--top-k", help="candidates explained per upload (default 3)"),
    model: Optional[str] = Model, layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines,
    k_colors: Optional[int] = KColors, cache: Optional[str] = Cache, cluster: Optional[str] = Cluster,
    workers: Optional[int] = Workers, batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt,
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="retry uploads that failed to load on an earlier night (default: skip them)"),
) -> None:
    """Embed new uploads, retrieve top-k gallery candidates, explain each, write a ranked candidates table."""
    from .config import NightlyConfig
    from .nightly import run_nightly

    values = _common(out=out, model=model, layers=layers, k_lines=k_lines, k_colors=k_colors, cache=cache,
                     cluster=cluster, workers=workers, batch_pairs=batch_pairs, device=device,
                     storage_option=storage_option)
    if top_k is not None:
        values["top_k"] = top_k
    config = NightlyConfig(uploads=uploads, gallery=gallery, retry_failed=retry_failed, **values)
    with prefect_api(), progress_bar("pairs"):
        summary = run_nightly(config)
    _finish(summary)


@app.command("reprocess")
def reprocess_cmd(
    out: str = Out,
    model: str = typer.Option(..., "--model", help="the NEW model spec"),
    old_model: Optional[str] = typer.Option(None, "--old-model", help="model_id to redo (default: all others)"),
    layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines, k_colors: Optional[int] = KColors,
    cache: Optional[str] = Cache, cluster: Optional[str] = Cluster, workers: Optional[int] = Workers,
    batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Re-explain every pair recorded under OUT with a new model (old partitions stay untouched)."""
    from .config import ReprocessConfig
    from .reprocess import run_reprocess

    config = ReprocessConfig(old_model=old_model, **_common(
        out=out, model=model, layers=layers, k_lines=k_lines, k_colors=k_colors, cache=cache, cluster=cluster,
        workers=workers, batch_pairs=batch_pairs, device=device, storage_option=storage_option))
    with prefect_api(), progress_bar("pairs"):
        summary = run_reprocess(config)
    _finish(summary)


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("pairx-demo", "--out", help="folder for the synthetic photos, results and index.html"),
    individuals: int = typer.Option(12, "--individuals", help="synthetic individuals in the gallery"),
    top_k: int = typer.Option(3, "--top-k", help="candidates explained per upload"),
    workers: Optional[int] = Workers,
) -> None:
    """Generate a gallery and a night of synthetic uploads, run the real nightly flow with the
    embedded demo model, score it against the ground truth and write index.html."""
    from pathlib import Path

    from .demo import DemoSettings, run_demo

    settings = DemoSettings(out=Path(out).resolve(), individuals=individuals, top_k=top_k, workers=workers)
    with prefect_api(), progress_bar("pairs"):
        summary = run_demo(settings)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(
        f"\nExplained {summary['done']} pairs in {summary['seconds_total']} s; top-1 retrieval "
        f"{summary['top1_accuracy']:.0%}; PAIR-X top-10 matches on the true spot "
        f"{summary['match_accuracy_top10']:.0%} (random cells: {summary['match_accuracy_random']:.0%}).\n"
        f"Open {summary['index_html']} in a browser; tables: {summary['tables']}; pictures: {summary['pictures']}"
    )
    if summary.get("failed"):
        raise typer.Exit(code=1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover - process workers re-import the main module
    main()
