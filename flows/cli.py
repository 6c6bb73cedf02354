"""The ``pairx`` command line: explain, nightly, reprocess, demo, layers, and upkeep (gc, compact, cache).

Order of work for a run: options and inputs are checked first (missing folders, broken pairs
tables, unknown models or layers, random weights: exit code 2 with one line, in seconds), then
the Prefect API is found (``PREFECT_API_URL``) or a temporary local server is started (it dies
with this process, even on SIGKILL), then the flow runs on its Dask cluster.

Exit codes: 0 done, 1 some items failed (or another run holds the output), 2 bad input or
options, 3 the run crashed (any exception; its ``runs`` row says ``crashed``), 130 SIGINT, 143
SIGTERM (``flows.stopping``). Every non-zero exit prints one ``error:`` line naming the cause;
``--debug`` adds the traceback. Third-party INFO logs (Dask, Prefect internals) are hidden unless
``--log-level INFO``.

This module holds the command definitions; the run sequence and exits are ``flows.run_entry``,
what is printed ``flows.console``, signals ``flows.stopping``, the Prefect server
``infra.prefect_server``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Optional

import typer

from infra.prefect_server import TemporaryAPI, prefect_api  # noqa: F401 - the names tests and bench use

from .run_entry import (EXIT_CRASHED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE,  # noqa: F401
                        STATE, _one_line, _preflight_error, _quiet_logs, _signal_code, _traceback_if_debug, fail,
                        reported_errors, run_command, storage_credentials)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PAIR-X explanations of animal re-identification matches, at pipeline scale.")

MODEL_HELP = ("model spec: miewid?weights=URL, hf://conservationxlabs/miewid-msv2, timm:<arch>?weights=FILE, "
              "torchvision:<arch>, python:<module>:<factory>, demo")



def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"pairx {version('pairx-pipeline')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            typer.echo("pairx (not installed)")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="print the version and exit"),
    log_level: str = typer.Option("WARNING", "--log-level", help="log level of Prefect and Dask (INFO shows all)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of errors"),
) -> None:
    """PAIR-X explanations of animal re-identification matches, at pipeline scale."""
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    STATE.log_level, STATE.debug = level, debug
    _quiet_logs(level)
    from infra.redaction import install_log_redaction

    install_log_redaction()  # every record of this process, at every level, without credentials


# ------------------------------------------------------------------------------ options
Out = typer.Option(..., "--out", help="output root: folder or URL (s3://bucket/prefix)")
Model = typer.Option(..., "--model", help=MODEL_HELP)
Layers = typer.Option(None, "--layers", help="layer name(s), comma-separated or repeated (default: the model "
                                             "family's default; see `pairx layers --model SPEC`)")
KLines = typer.Option(None, "--k-lines", help="matches drawn as lines (default 20)")
KColors = typer.Option(None, "--k-colors", help="matches drawn as colour regions; 0 skips pixel relevance (default 10)")
Cache = typer.Option(None, "--cache", help="activation cache URL (default OUT/cache)")
Cluster = typer.Option(None, "--cluster", help="existing Dask scheduler, e.g. tcp://host:8786 (default: LocalCluster)")
Workers = typer.Option(None, "--workers", help="LocalCluster workers (default: one per GPU, else 1; 0: no Dask, "
                                               "tasks run in this process)")
BatchPairs = typer.Option(None, "--batch-pairs", help="pairs per task batch (default 8)")
Device = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)")
StorageOpt = typer.Option(None, "--storage-option",
                          help="fsspec option KEY=VALUE for remote URLs, e.g. key=... secret=... (repeatable); "
                               "passed to every process through the environment, never stored")
AllowRandom = typer.Option(False, "--allow-random-weights",
                           help="run a model spec that has no weights (random initialisation; for tests only)")
PublicUrl = typer.Option(None, "--public-url", help="base URL where OUT is published (dashboards, report links)")
JsonOut = typer.Option(False, "--json", help="print the machine-readable summary (JSON) instead of the human one")


def _common(**kwargs) -> dict:
    layers = kwargs.pop("layers")
    values = {k: v for k, v in kwargs.items() if v is not None}
    if layers:
        values["layers"] = [name for item in layers for name in item.split(",") if name]
    return values


def _config(cls, **values):
    try:
        return cls(**values)
    except Exception as error:  # noqa: BLE001 - pydantic's ValidationError: one line, exit 2
        _preflight_error(error)


@app.command("explain")
def explain_cmd(
    pairs: str = typer.Argument(..., help="pairs table (CSV/Parquet) with image_0, image_1[, pair_id, box_0, box_1]"),
    out: str = Out,
    model: str = Model,
    image_root: Optional[str] = typer.Option(None, "--image-root", help="prefix for relative image paths"),
    layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines,
    k_colors: Optional[int] = KColors, cache: Optional[str] = Cache, cluster: Optional[str] = Cluster,
    workers: Optional[int] = Workers, batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt, allow_random_weights: bool = AllowRandom,
    public_url: Optional[str] = PublicUrl, json_output: bool = JsonOut,
    max_missing: float = typer.Option(0.05, "--max-missing", help="refuse the run when more than this share of "
                                                                 "the referenced images is missing (default 0.05)"),
    allow_urls: bool = typer.Option(False, "--allow-urls", help="with --image-root: read URL entries as written"),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root",
                                            help="with --image-root: read absolute paths and paths leaving it"),
) -> None:
    """Explain every pair of a pairs table; write pictures and Parquet tables under OUT."""
    from .config import ExplainPairsConfig
    with storage_credentials(storage_option or []):
        config = _config(ExplainPairsConfig, pairs=pairs, image_root=image_root, max_missing=max_missing,
                         allow_urls=allow_urls, allow_outside_root=allow_outside_root, **_common(
            out=out, model=model, layers=layers, k_lines=k_lines, k_colors=k_colors, cache=cache, cluster=cluster,
            workers=workers, batch_pairs=batch_pairs, device=device, allow_random_weights=allow_random_weights,
            public_url=public_url))
        run_command("explain_pairs", config, "explain_pairs", json_output)


@app.command("nightly")
def nightly_cmd(
    uploads: str = typer.Option(..., "--uploads", help="folder/URL of new photos (recursive)"),
    gallery: str = typer.Option(..., "--gallery",
                                help="gallery: one folder per individual, or manifest CSV image,individual"),
    out: str = Out,
    model: str = Model,
    top_k: Optional[int] = typer.Option(None, "--top-k", help="candidates explained per upload (default 3)"),
    rerank_k: Optional[int] = typer.Option(None, "--rerank-k",
                                           help="candidates per upload re-ranked by PAIR-X plausibility: the --top-k "
                                                "most similar are explained, the others judged from the activation "
                                                "cache, any they lift into the top-k explained too (default 5; 0 or "
                                                "not more than --top-k: off)"),
    layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines,
    k_colors: Optional[int] = KColors, cache: Optional[str] = Cache, cluster: Optional[str] = Cluster,
    workers: Optional[int] = Workers, batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt, allow_random_weights: bool = AllowRandom,
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="retry uploads that failed to load on an earlier night "
                                           "(default: skip them)"),
    public_url: Optional[str] = PublicUrl, json_output: bool = JsonOut,
    unlabelled_gallery: bool = typer.Option(False, "--unlabelled-gallery",
                                            help="accept a gallery folder without individual folders"),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root",
                                            help="read gallery manifest entries that leave its folder (..)"),
    detections: Optional[str] = typer.Option(None, "--detections",
                                             help="MegaDetector batch-output JSON for the uploads: each kept "
                                                  "detection is one upload (its box cropped)"),
    category: str = typer.Option("animal", "--category", help="with --detections: detection category to keep"),
    min_confidence: Optional[float] = typer.Option(
        None, "--min-confidence", help="with --detections: confidence threshold (default: the file's "
                                       "typical_detection_threshold, else 0.2)"),
    species: Optional[str] = typer.Option(None, "--species",
                                          help="with --detections: keep detections whose top classification is this"),
    confirmed: bool = typer.Option(True, "--confirmed/--no-confirmed",
                                   help="add the uploads confirmed on earlier nights (decision match or "
                                        "new_individual) to the gallery"),
) -> None:
    """Embed new uploads, retrieve top-k gallery candidates, explain each, write a ranked candidates table."""
    from .config import NightlyConfig
    with storage_credentials(storage_option or []):
        config = _config(NightlyConfig, uploads=uploads, gallery=gallery, retry_failed=retry_failed,
                         unlabelled_gallery=unlabelled_gallery, allow_outside_root=allow_outside_root,
                         detections=detections, category=category, min_confidence=min_confidence, species=species,
                         confirmed=confirmed, **_common(
            out=out, model=model, layers=layers, k_lines=k_lines, k_colors=k_colors, cache=cache, cluster=cluster,
            workers=workers, batch_pairs=batch_pairs, device=device, top_k=top_k, rerank_k=rerank_k,
            allow_random_weights=allow_random_weights, public_url=public_url))
        run_command("nightly", config, "nightly", json_output)


@app.command("reprocess")
def reprocess_cmd(
    out: str = Out,
    model: str = typer.Option(..., "--model", help="the NEW model spec"),
    old_model: Optional[str] = typer.Option(None, "--old-model", help="model_id to redo (default: all others)"),
    layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines, k_colors: Optional[int] = KColors,
    cache: Optional[str] = Cache, cluster: Optional[str] = Cluster, workers: Optional[int] = Workers,
    batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt, allow_random_weights: bool = AllowRandom,
    json_output: bool = JsonOut,
) -> None:
    """Re-explain every pair recorded under OUT with a new model (old partitions stay untouched)."""
    from .config import ReprocessConfig
    with storage_credentials(storage_option or []):
        config = _config(ReprocessConfig, old_model=old_model, **_common(
            out=out, model=model, layers=layers, k_lines=k_lines, k_colors=k_colors, cache=cache, cluster=cluster,
            workers=workers, batch_pairs=batch_pairs, device=device, allow_random_weights=allow_random_weights))
        run_command("reprocess", config, "reprocess", json_output)


@app.command("layers")
def layers_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    allow_random_weights: bool = typer.Option(True, "--allow-random-weights/--weights-required",
                                              help="list the layers of a spec without weights too (default)"),
) -> None:
    """List the layers of a model that PAIR-X can explain, with feature-map shapes; * marks the default."""
    try:
        from pairx_core.layers import list_layers
        from infra.model_runtime import get_model

        from .preflight import check_model_spec

        check_model_spec(model, allow_random_weights)
        loaded = get_model(model, "cpu")
        infos = list_layers(loaded.model, tuple(loaded.preprocessing.size), include_leaves=False)
    except Exception as error:  # noqa: BLE001
        _preflight_error(error)
    size = "x".join(map(str, loaded.preprocessing.size))
    typer.echo(f"layers of {model} at {size} px (C x h x w); * = default")
    for info in infos:
        shape = " x ".join(map(str, info.shape))
        typer.echo(f"{'*' if info.is_default else ' '} {info.name:<40} {shape}")


from .upkeep_cmd import register_upkeep  # noqa: E402 - gc, compact, verify, cache, report
from .review_cmd import register_review_commands  # noqa: E402 - a light module (typer only)

register_upkeep(app)
register_review_commands(app)


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("pairx-demo", "--out", help="folder for the synthetic photos, results and index.html"),
    individuals: int = typer.Option(12, "--individuals", help="synthetic individuals in the gallery"),
    top_k: int = typer.Option(3, "--top-k", help="candidates explained per upload"),
    workers: Optional[int] = Workers,
    auto_decide: bool = typer.Option(False, "--auto-decide", help="record the true decisions (reviewer "
                                     "demo-ground-truth) so that the review views and index have figures"),
    json_output: bool = JsonOut,
) -> None:
    """Generate a gallery and a night of synthetic uploads, run the real nightly flow with the
    embedded demo model, score it against the ground truth and write index.html."""
    from pathlib import Path

    from .console import PhaseClock, human_summary
    from .run_entry import command_guard, exit_for, run_flow

    folder = Path(out).resolve()
    typer.echo(f"demo: {individuals} synthetic individuals, top-{top_k}, output {folder}", err=True)

    clock = PhaseClock()
    api = TemporaryAPI()
    with command_guard(api, json_output) as control:
        api.start_soon()  # starts while torch loads and the demo's photos are drawn
        from .demo import DemoSettings, prepare_demo, run_demo

        from pairx_core.runtime_settings import configure_task_process

        configure_task_process()  # this process runs the demo's tasks when --workers 0
        settings = DemoSettings(out=folder, individuals=individuals, top_k=top_k, workers=workers,
                                auto_decide=auto_decide)
        try:
            prepared = prepare_demo(settings)
        except BaseException:
            api.stop()
            raise
        clock.mark("photos")
        summary, failed = run_flow(lambda: run_demo(settings, prepared), api, control, clock, json_output)
    summary["startup"] = clock.phases(flow_seconds=summary.get("seconds"))
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    elif "top1_accuracy" in summary:
        typer.echo(
            f"Explained {summary['done']} pairs in {summary['seconds_total']} s; top-1 retrieval "
            f"{summary['top1_accuracy']:.0%}; PAIR-X top-10 matches on the true spot "
            f"{summary['match_accuracy_top10']:.0%} (random cells: {summary['match_accuracy_random']:.0%}).\n"
            f"Open {summary['index_html']} in a browser (review site: {summary.get('report', 'not written')}); "
            f"tables: {summary['tables']}; pictures: {summary['pictures']}")
    else:
        typer.echo(human_summary("demo", summary, str(settings.out / "results")))
    if "decisions" in summary and not json_output:
        typer.echo(f"Ground truth decided: {summary['decisions'] or 'nothing new'}")
    exit_for(summary, failed)


def main() -> None:  # pragma: no cover - the console script; tests drive ``app`` or the installed command
    """Run the CLI, then leave without the interpreter's teardown.

    Everything a command writes is closed or flushed when it returns (tables, logs, its Prefect
    server stopped, its cluster closed); what remains at exit is freeing torch, Prefect and pandas
    module by module, which took 1-3 s of wall time per command. ``os._exit`` skips that.
    """
    code: int | str | None = 0
    try:
        app()
    except SystemExit as done:
        code = done.code
    except BaseException as error:  # noqa: BLE001 - whatever escaped the commands: one line, never exit 0
        _traceback_if_debug(error)
        code = _signal_code(error) or EXIT_CRASHED
        print(f"error: {_one_line(error)}", file=sys.stderr)
    finally:
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover - process workers re-import the main module
    main()
