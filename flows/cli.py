"""The ``pairx`` command line: explain, nightly, reprocess, demo, layers, and upkeep (gc, compact, cache).

Order of work for a run: options and inputs are checked first (missing folders, broken pairs
tables, unknown models or layers, random weights: exit code 2 with one line, in seconds), then
the Prefect API is found (``PREFECT_API_URL``) or a temporary local server is started (it dies
with this process, even on SIGKILL), then the flow runs on its Dask cluster.

Exit codes: 0 done, 1 some items failed or the run stopped on an error, 2 bad input or options,
130 interrupted (Ctrl-C, SIGTERM). Third-party INFO logs (Dask, Prefect internals) are hidden
unless ``--log-level INFO``; ``--debug`` adds tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Iterator, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PAIR-X explanations of animal re-identification matches, at pipeline scale.")

MODEL_HELP = ("model spec: miewid?weights=URL, hf://conservationxlabs/miewid-msv2, timm:<arch>?weights=FILE, "
              "torchvision:<arch>, python:<module>:<factory>, demo")

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _State:
    log_level: str = "WARNING"
    debug: bool = False


STATE = _State()


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


def _quiet_logs(level: str) -> None:
    """Third-party logs at ``level`` in this process and in the Dask workers it starts."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # runs are offline by default:
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no usage data, no notice about it
    os.environ["PREFECT_LOGGING_LEVEL"] = level
    os.environ["DASK_LOGGING__DISTRIBUTED"] = level.lower()
    for name in ("distributed", "prefect", "httpx", "asyncio", "fsspec", "s3fs", "botocore"):
        logging.getLogger(name).setLevel(level)
    if level == "WARNING":  # the nanny's "still alive after 4 s, killing" at every LocalCluster close
        logging.getLogger("distributed.nanny").setLevel("ERROR")


# ------------------------------------------------------------------------------ errors and exits
def fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Known errors become one line and an exit code; tracebacks only with ``--debug``."""
    from pydantic import ValidationError

    from pairx_core.errors import PairXError

    from .outcome import ItemsFailedError

    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except ItemsFailedError:
        raise
    except ValidationError as error:
        if STATE.debug:
            raise
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
        fail(problems)
    except KeyboardInterrupt:
        typer.echo("interrupted: the run is recorded as cancelled; rerun the same command to continue", err=True)
        raise typer.Exit(code=EXIT_INTERRUPTED)
    except PairXError as error:
        if STATE.debug:
            raise
        fail(str(error), code=EXIT_FAILED)


def _preflight_error(error: BaseException) -> None:
    """Bad input found before the run: exit code 2."""
    from pydantic import ValidationError

    if STATE.debug:
        raise error
    if isinstance(error, ValidationError):
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()))
    fail(str(error))


# ------------------------------------------------------------------------------ Prefect API
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the temporary server gets SIGTERM when the CLI dies, however it dies (SIGKILL too)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: the temporary server lives for one command and never holds deployments, schedules or paused
#: runs: the services that poll for those are off (they only take CPU from the run's workers)
TEMPORARY_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
    **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in (
        "SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CANCELLATION_CLEANUP")},
}


def _settings_in_this_process() -> dict[str, str]:
    """Prefect settings changed in this process (``temporary_settings``), as environment variables;
    none when Prefect is not imported yet (the server then reads the same profile and environment)."""
    if "prefect.settings" not in sys.modules:
        return {}
    from prefect.settings import get_current_settings

    return get_current_settings().to_environment_variables(exclude_unset=True)


class OwnedServer:
    """Prefect's API server (uvicorn, SQLite under ``PREFECT_HOME``) as a child of this process.

    Started from the main thread with ``PR_SET_PDEATHSIG`` (Linux): the kernel sends it SIGTERM
    when the thread that started it ends, which for the main thread means when the CLI dies,
    however it dies. (Started from a helper thread, it would die with that thread.)
    """

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        """Start the server process now; it imports Prefect's server on its own core while this
        process goes on (so this process does not import Prefect first)."""
        import importlib.util
        import subprocess
        from pathlib import Path

        env = {**os.environ, **_settings_in_this_process(), **TEMPORARY_SERVER_ENV}
        env.pop("PREFECT_API_URL", None)
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def wait_healthy(self, timeout: float = 90.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.process.kill()
                self.process.wait()
        self.process = None


class TemporaryAPI:
    """Prefect's API for this command: ``PREFECT_API_URL`` if set, else a temporary local server.

    :meth:`start_soon` starts the server in a background thread, so that its start-up (several
    seconds) overlaps with loading torch and the model; entering waits for it.
    """

    def __init__(self) -> None:
        self.server = None
        self.thread = None
        self.error: BaseException | None = None

    @property
    def needed(self) -> bool:
        return not os.environ.get("PREFECT_API_URL")

    def start_soon(self) -> "TemporaryAPI":
        import threading

        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        if self.needed and self.thread is None:
            self.server = OwnedServer()
            self.server.spawn()  # from this (main) thread: see OwnedServer

            def wait() -> None:
                try:
                    self.server.wait_healthy()
                except BaseException as error:  # noqa: BLE001 - reported when entered
                    self.error = error

            self.thread = threading.Thread(target=wait, name="prefect-server-wait", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.server is not None:
            self.server.stop()
            self.server = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if not self.needed and self.server is None:
            yield
            return
        from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        self.start_soon()
        self.thread.join()
        if self.error is not None:
            raise self.error
        os.environ["PREFECT_API_URL"] = self.server.api_url
        try:
            # no heartbeats: they serve a long-lived server's crash detection, and each flow's
            # exit waits up to 1 s for the heartbeat thread to wake up and stop
            with temporary_settings(updates={PREFECT_API_URL: self.server.api_url,
                                             PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                yield
        finally:
            _flush_logs()
            os.environ.pop("PREFECT_API_URL", None)
            self.stop()


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Use PREFECT_API_URL if set, else a temporary local server shared with the workers."""
    with TemporaryAPI().active():
        yield


def _flush_logs() -> None:
    """Send queued flow/task logs and events before the temporary server goes away.

    Without this the log and event workers keep retrying a closed port for about a minute at
    exit and then print "Error logging to API".
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    workers = (APILogWorker, EventsWorker)
    # a drain with items queued logs "Still processing items" at WARNING (under the service's class
    # name, whichever class's drain_all stops it): expected here, not news for the user
    service_loggers = [logging.getLogger(worker.__name__) for worker in workers]
    levels = [service_logger.level for service_logger in service_loggers]
    for service_logger in service_loggers:
        service_logger.setLevel(logging.ERROR)
    try:
        for worker in workers:
            try:
                worker.drain_all(timeout=10)
            except Exception:  # noqa: BLE001 - losing the last log lines must never fail the run
                pass
    finally:
        for service_logger, level in zip(service_loggers, levels):
            service_logger.setLevel(level)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: recorded as cancelled, server and cluster stopped."""
    from .outcome import RunTerminated

    def handler(signum, frame):
        raise RunTerminated("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a test runner): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def storage_credentials(pairs: list[str]) -> Iterator[None]:
    """``--storage-option`` values reach every process through the environment, never a config."""
    from infra.storage import STORAGE_OPTIONS_ENV

    if not pairs:
        yield
        return
    options = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "{}")
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--storage-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key] = json.loads(value) if value[:1] in "[{" or value in ("true", "false") else value
    previous = os.environ.get(STORAGE_OPTIONS_ENV)
    os.environ[STORAGE_OPTIONS_ENV] = json.dumps(options)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(STORAGE_OPTIONS_ENV, None)
        else:
            os.environ[STORAGE_OPTIONS_ENV] = previous


# ------------------------------------------------------------------------------ progress and summary
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
            planned = summary.planned.get("pairs_planned")
            finished = summary.done + summary.skipped + summary.failed
            rate = summary.done / max(time.perf_counter() - started, 1e-9)
            bar.update(task_id, description="pairs" if planned is not None else "preparing",
                       completed=finished, total=planned, rate=f"{rate:.2f} pairs/s" if summary.done else "")

        moved = _point_log_handlers(sys.stderr)
        try:
            with listen(update):
                yield
        finally:
            for handler, stream in moved:
                handler.setStream(stream)


def _point_log_handlers(stream) -> list[tuple[logging.StreamHandler, object]]:
    moved = []
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.__stderr__:
                moved.append((handler, handler.setStream(stream)))
    return moved


def human_summary(flow: str, summary: dict, out: str) -> str:
    done, skipped, failed = summary.get("done", 0), summary.get("skipped", 0), summary.get("failed", 0)
    seconds = summary.get("seconds") or 0.0
    rate = f" ({done / seconds:.2f} pairs/s)" if done and seconds else ""
    lines = [f"{flow} {summary.get('status', 'completed')}: {done} explained, {skipped} skipped, {failed} failed "
             f"in {seconds:.1f} s{rate}; run {summary.get('run_id')}"]
    if summary.get("detections"):
        lines.append(summary["detections"])
    lines.append(f"tables: {out}/tables   pictures: {out}/viz")
    if summary.get("report"):
        lines.append(f"review page: {summary['report']}")
    if failed:
        lines.append(f"errors: {out}/tables/errors (run_id = {summary.get('run_id')})")
    return "\n".join(lines)


def run_command(flow: str, config, entry_module: str, json_output: bool) -> None:
    """Check inputs, start the API, run the entry flow, print the summary, exit with its code.

    The entry flow's module (Prefect, torch, ...) is imported only after the cheap checks passed.
    """
    from importlib import import_module

    from .outcome import ItemsFailedError
    from .night_plan import remember_model
    from .preflight import check_inputs, check_model_spec, resolve_model

    clock = PhaseClock()
    api = TemporaryAPI()
    try:
        plan = check_inputs(flow, config)
        typer.echo(plan.describe(config), err=True)
        clock.mark("checks")
        # before the model spec's own check, which imports torch: only a spec that passed every
        # check on an earlier run of this output is remembered
        quiet = _quiet_night(config) if flow == "nightly" and api.needed else None
        if quiet is not None:
            clock.mark("quiet_night")
            _print_summary(flow, quiet, clock, config, json_output)
            return
        api.start_soon()  # the server starts while torch and the model load (stopped if a check fails)
        check_model_spec(config.model, config.allow_random_weights)
        model = resolve_model(config)
        if flow == "nightly":
            remember_model(config, model)
        clock.mark("model")
    except Exception as error:  # noqa: BLE001 - any problem found here is the input's
        api.stop()
        _preflight_error(error)
    entry = getattr(import_module(f"flows.{entry_module}"), flow)
    failed = False
    with reported_errors(), sigterm_as_interrupt():
        with api.active(), progress_display(not json_output):
            clock.mark("prefect_api")
            try:
                summary = entry(config)
            except ItemsFailedError as error:
                summary, failed = error.summary, True
            clock.mark("flow")
        clock.mark("shutdown")
    _print_summary(flow, summary, clock, config, json_output)
    if failed:
        raise typer.Exit(code=EXIT_FAILED)


def _print_summary(flow: str, summary: dict, clock: "PhaseClock", config, json_output: bool) -> None:
    summary["startup"] = clock.phases(flow_seconds=summary.get("seconds"))
    typer.echo(json.dumps(summary, indent=2) if json_output else human_summary(flow, summary, config.out))


def _quiet_night(config) -> dict | None:
    """A night with nothing new for a model seen before on this output, recorded without Prefect
    or torch (``flows.night_plan``); ``None``: take the normal path (which reports any problem)."""
    from .night_plan import record_quiet_night

    try:
        return record_quiet_night(config)
    except Exception as error:  # noqa: BLE001 - the normal path checks and reports properly
        logging.getLogger("pairx.cli").debug("quiet-night short path not taken: %s", error)
        return None


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
    gallery: str = typer.Option(..., "--gallery", help="gallery: one folder per individual, or manifest CSV image,individual"),
    out: str = Out,
    model: str = Model,
    top_k: Optional[int] = typer.Option(None, "--top-k", help="candidates explained per upload (default 3)"),
    rerank_k: Optional[int] = typer.Option(None, "--rerank-k",
                                           help="candidates per upload judged by PAIR-X from the activation cache and "
                                                "re-ranked before the top-k are explained (default 20; 0: off)"),
    layers: Optional[list[str]] = Layers, k_lines: Optional[int] = KLines,
    k_colors: Optional[int] = KColors, cache: Optional[str] = Cache, cluster: Optional[str] = Cluster,
    workers: Optional[int] = Workers, batch_pairs: Optional[int] = BatchPairs, device: Optional[str] = Device,
    storage_option: Optional[list[str]] = StorageOpt, allow_random_weights: bool = AllowRandom,
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="retry uploads that failed to load on an earlier night (default: skip them)"),
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
                         confirmed=confirmed,
                         **_common(
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
        from tasks.runtime import get_model

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

register_upkeep(app)

from .review_cmd import register_review_commands  # noqa: E402 - a light module (typer only)

register_review_commands(app)


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("pairx-demo", "--out", help="folder for the synthetic photos, results and index.html"),
    individuals: int = typer.Option(12, "--individuals", help="synthetic individuals in the gallery"),
    top_k: int = typer.Option(3, "--top-k", help="candidates explained per upload"),
    workers: Optional[int] = Workers,
    json_output: bool = JsonOut,
) -> None:
    """Generate a gallery and a night of synthetic uploads, run the real nightly flow with the
    embedded demo model, score it against the ground truth and write index.html."""
    from pathlib import Path

    from .outcome import ItemsFailedError

    folder = Path(out).resolve()
    typer.echo(f"demo: {individuals} synthetic individuals, top-{top_k}, output {folder}", err=True)
    clock = PhaseClock()
    api = TemporaryAPI().start_soon()  # starts while torch loads and the demo's photos are drawn
    failed = False
    with reported_errors(), sigterm_as_interrupt():
        from .demo import DemoSettings, prepare_demo, run_demo

        settings = DemoSettings(out=folder, individuals=individuals, top_k=top_k, workers=workers)
        prepared = prepare_demo(settings)
        clock.mark("photos")
        with api.active(), progress_display(not json_output):
            clock.mark("prefect_api")
            try:
                summary = run_demo(settings, prepared)
            except ItemsFailedError as error:
                summary, failed = error.summary, True
            clock.mark("flow")
        clock.mark("shutdown")
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
    if failed:
        raise typer.Exit(code=EXIT_FAILED)


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
