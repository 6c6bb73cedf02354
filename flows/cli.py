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

EXIT_FAILED, EXIT_USAGE, EXIT_CRASHED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143


class _State:
    log_level: str = "WARNING"
    debug: bool = False
    #: the command's --json: errors are also printed on stdout as a JSON object
    json_output: bool = False


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
    from infra.redaction import install_log_redaction

    install_log_redaction()  # every record of this process, at every level, without credentials


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


class _RunLogFilter(logging.Filter):
    """Without ``--debug``, Prefect's run loggers keep to one line per problem on the console.

    The CLI reports how a run ended itself (summary, failed items, one ``error:`` line), so the
    flow engine's copy of the exception (a traceback of the flow's frames) is dropped, and task
    errors keep their line without the traceback. A run stopped by a signal says so once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if STATE.debug:
            return True
        if record.name.startswith("prefect.flow_runs"):
            if record.exc_info or "Crash detected!" in str(record.msg):
                return False
        if record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


RUN_LOG_FILTER = _RunLogFilter()


def _filter_run_logs() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if RUN_LOG_FILTER not in run_logger.filters:
            run_logger.addFilter(RUN_LOG_FILTER)


def _quiet_after_signal() -> None:
    """Once a stop is asked for, the cancelled tasks' and closing cluster's complaints are noise."""
    if not STATE.debug:
        for name in ("distributed", "prefect"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# ------------------------------------------------------------------------------ errors and exits
def fail(message: str, code: int = EXIT_USAGE, **details) -> None:
    """One line on stderr (and, with ``--json``, a JSON error object on stdout), then exit ``code``."""
    from infra.redaction import redact_text

    line = redact_text(" ".join(str(message).split())) or "unknown error"
    typer.echo(f"error: {line}", err=True)
    if STATE.json_output:
        typer.echo(json.dumps({"status": "error", "exit_code": code, "error": line, **details}, indent=2))
    raise typer.Exit(code=code)


def _one_line(error: BaseException) -> str:
    """What went wrong, in one line: the message for the project's own errors, else ``Type: message``."""
    from pairx_core.errors import PairXError

    text = " ".join(str(error).split())
    if isinstance(error, PairXError) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _traceback_if_debug(error: BaseException) -> None:
    if STATE.debug:
        import traceback

        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def _signal_code(error: BaseException) -> int | None:
    """Exit code of a stop by signal (130 SIGINT, 143 SIGTERM), a self-abort (3), else None."""
    from .outcome import RunAborted
    from .stopping import exit_code_for

    if isinstance(error, RunAborted):
        return EXIT_CRASHED
    number = getattr(error, "signal", None)  # Prefect's TerminationSignal
    if isinstance(number, int):
        return exit_code_for(number)
    if isinstance(error, KeyboardInterrupt):
        name = error.args[0] if error.args else "SIGINT"
        return EXIT_TERMINATED if name == "SIGTERM" else EXIT_INTERRUPTED
    return None


def _signal_name(code: int) -> str:
    import signal as signals

    try:
        return signals.Signals(code - 128).name
    except ValueError:
        return f"exit {code}"


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Whatever stops a command becomes one line and an exit code (``--debug``: plus the traceback).

    2 bad input or options; 1 another run holds the output; 3 the run crashed (any other error,
    the project's or not); 130/143 interrupted by SIGINT/SIGTERM (the run is recorded cancelled).
    """
    from pydantic import ValidationError

    from infra.lease import OutputLockedError

    from .outcome import ItemsFailedError, RunAborted

    try:
        yield
    except (typer.Exit, typer.Abort, ItemsFailedError):
        raise
    except ValidationError as error:
        _traceback_if_debug(error)
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()))
    except OutputLockedError as error:
        _traceback_if_debug(error)
        fail(str(error), code=EXIT_FAILED)
    except BaseException as error:  # noqa: BLE001 - every other way out is reported, never silent
        code = _signal_code(error)
        _traceback_if_debug(error)
        if isinstance(error, RunAborted):
            fail(f"{error.args[0]}; the run is recorded as crashed", code=EXIT_CRASHED)
        if code is not None:
            typer.echo(f"interrupted ({_signal_name(code)}): a run that started is recorded as cancelled; "
                       "rerun the same command to continue", err=True)
            if STATE.json_output:
                typer.echo(json.dumps({"status": "cancelled", "exit_code": code}, indent=2))
            raise typer.Exit(code=code) from None
        if not isinstance(error, Exception):
            raise
        fail(f"{_one_line(error)} (the run is recorded as crashed{'' if STATE.debug else '; --debug shows the traceback'})",
             code=EXIT_CRASHED)


def _preflight_error(error: BaseException) -> None:
    """Bad input found before the run: exit code 2 (``--debug``: plus the traceback)."""
    from pydantic import ValidationError

    _traceback_if_debug(error)
    if isinstance(error, ValidationError):
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()))
    fail(_one_line(error))


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
        self.watching = False

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
        self.watching = False
        if self.server is not None:
            self.server.stop()  # first: a wait for health still running ends when the process does
            self.server = None
        if self.thread is not None:
            self.thread.join(timeout=5)

    def kill(self) -> None:
        """Stop the server now, without waiting (a forced exit)."""
        server = self.server
        if server is not None and server.process is not None:
            with contextlib.suppress(Exception):
                server.process.kill()

    def watch(self, on_lost) -> None:
        """Call ``on_lost(message)`` (once) if the temporary server exits while the command runs."""
        import threading

        server = self.server
        if server is None or server.process is None:
            return
        self.watching = True

        def poll() -> None:
            process = server.process
            while self.watching and process is not None:
                code = process.poll()
                if code is not None:
                    if self.watching:
                        on_lost(f"the temporary Prefect server exited (code {code}) during the run")
                    return
                time.sleep(0.5)

        threading.Thread(target=poll, name="prefect-server-watch", daemon=True).start()

    @contextlib.contextmanager
    def active(self, on_lost=None) -> Iterator[None]:
        """The API for the block; ``on_lost(message)``: called if the temporary server dies meanwhile."""
        if not self.needed and self.server is None:
            yield
            return
        from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        self.start_soon()
        try:
            self.thread.join()
        except BaseException:  # a signal while the server starts: it is stopped with the command
            self.stop()
            raise
        if self.error is not None:
            self.stop()
            raise self.error
        os.environ["PREFECT_API_URL"] = self.server.api_url
        if on_lost is not None:
            self.watch(on_lost)
        try:
            # no heartbeats: they serve a long-lived server's crash detection, and each flow's
            # exit waits up to 1 s for the heartbeat thread to wake up and stop
            with temporary_settings(updates={PREFECT_API_URL: self.server.api_url,
                                             PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                yield
        finally:
            self.watching = False
            if self.server is not None and self.server.process is not None and self.server.process.poll() is None:
                _flush_logs()  # (a dead server takes no logs: flushing would wait for nothing)
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
    lines = [f"{flow} {summary.get('status', 'completed')}: {done} explained, {skipped} skipped, {failed} failed "
             f"in {seconds:.1f} s{rate}; run {summary.get('run_id')}"]
    lines.append(f"tables: {out}/tables   pictures: {out}/viz")
    if summary.get("report"):
        lines.append(f"review page: {summary['report']}")
    if failed:
        lines.append(f"errors: {out}/tables/errors (run_id = {summary.get('run_id')})")
        items = summary.get("failed_items") or []
        if items:
            lines.append(f"failed items ({len(items)} of {failed} shown):" if failed > len(items) else "failed items:")
            for item in items:
                message = " ".join(str(item.get("message") or "").split())[:160]
                lines.append(f"  {item.get('item')} [{item.get('stage')}] {item.get('error_type')}: {message}")
    return "\n".join(lines)


def run_command(flow: str, config, entry_module: str, json_output: bool) -> None:
    """Check inputs, start the API, run the entry flow, print the summary, exit with its code.

    The entry flow's module (Prefect, torch, ...) is imported only after the cheap checks passed.
    """
    from importlib import import_module

    from infra.redaction import hide_model_secrets

    from .night_plan import remember_model
    from .outcome import ItemsFailedError
    from .preflight import check_inputs, check_model_spec, resolve_model
    from .stopping import stop_on_signals

    STATE.json_output = json_output
    clock = PhaseClock()
    api = TemporaryAPI()
    failed = False
    with stop_on_signals(on_exit=api.kill, on_signal=_quiet_after_signal) as control, reported_errors():
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
            # the flow (and Prefect's record of its parameters) sees the spec without credentials;
            # the full spec reaches the model loaders through the environment
            config = config.model_copy(update={"model": hide_model_secrets(config.model)})
            clock.mark("model")
        except Exception as error:  # noqa: BLE001 - any problem found here is the input's
            api.stop()
            _preflight_error(error)
        except BaseException:  # a signal during the checks: nothing started yet but the server
            api.stop()
            raise
        entry = getattr(import_module(f"flows.{entry_module}"), flow)
        _filter_run_logs()
        with api.active(on_lost=control.abort), progress_display(not json_output):
            clock.mark("prefect_api")
            try:
                summary = entry(config)
            except ItemsFailedError as error:
                summary, failed = error.summary, True
            clock.mark("flow")
        clock.mark("shutdown")
    if failed:
        summary["errors_table"] = f"{config.out.rstrip('/')}/tables/errors"
        summary["failed_items"] = failed_items(config, summary["run_id"])
    _print_summary(flow, summary, clock, config, json_output)
    _exit_for(summary, failed)


def _exit_for(summary: dict, failed: bool) -> None:
    """Exit 1 for failed items (after their list), 3 for a run recorded as crashed."""
    if summary.get("status") == "crashed":
        raise typer.Exit(code=EXIT_CRASHED)
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
) -> None:
    """Explain every pair of a pairs table; write pictures and Parquet tables under OUT."""
    from .config import ExplainPairsConfig
    with storage_credentials(storage_option or []):
        config = _config(ExplainPairsConfig, pairs=pairs, image_root=image_root, **_common(
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
) -> None:
    """Embed new uploads, retrieve top-k gallery candidates, explain each, write a ranked candidates table."""
    from .config import NightlyConfig
    with storage_credentials(storage_option or []):
        config = _config(NightlyConfig, uploads=uploads, gallery=gallery, retry_failed=retry_failed, **_common(
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


@app.command("gc")
def gc_cmd(
    out: str = typer.Argument(..., help="output root: folder or URL (s3://bucket/prefix)"),
    min_age_hours: float = typer.Option(1.0, "--min-age-hours", help="only files older than this (a batch still "
                                                                     "being written is younger)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, remove nothing"),
) -> None:
    """Remove what interrupted batches left under OUT: uncommitted matches files, pictures, temp files."""
    try:
        from infra.gc import collect_orphans

        report = collect_orphans(out, min_age_s=min_age_hours * 3600, dry_run=dry_run)
    except Exception as error:  # noqa: BLE001
        _preflight_error(error)
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(report.matches_files)} uncommitted matches file(s), {len(report.pictures)} "
               f"picture(s), {len(report.temp_files)} temporary file(s)")
    for url in report.matches_files + report.pictures + report.temp_files:
        typer.echo(f"  {url}")


@app.command("compact")
def compact_cmd(
    out: str = typer.Argument(..., help="output root (a local folder)"),
    table: Optional[list[str]] = typer.Option(None, "--table", help="only this table (repeatable; default: all)"),
    lease_wait: float = typer.Option(0.0, "--lease-wait", help="seconds to wait for a run holding OUT to finish "
                                                               "(default: refuse at once)"),
    json_output: bool = JsonOut,
) -> None:
    """Rewrite each table partition's small Parquet files into one file (readers see the same rows).

    Refuses while a run writes OUT (it holds the output's lease); runs started meanwhile wait.
    """
    from infra.lease import OutputLockedError

    try:
        from infra.compaction import compact_output

        results = compact_output(out, table or None, lease_wait_s=lease_wait)
    except OutputLockedError as error:
        fail(str(error), code=EXIT_FAILED)
    except Exception as error:  # noqa: BLE001
        _preflight_error(error)
    if json_output:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    for r in results:
        typer.echo(f"{r.table}: {r.files_before} -> {r.files_after} file(s), {r.bytes_before / 1e6:.2f} -> "
                   f"{r.bytes_after / 1e6:.2f} MB ({len(r.partitions)} partition(s), {r.rows_rewritten} row(s) "
                   "rewritten)")


cache_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Inspect and prune the activation cache (embeddings and feature maps).")
app.add_typer(cache_app, name="cache")
CacheOut = typer.Argument(..., help="output root: folder or URL (its cache is OUT/cache unless --cache says)")


def _cache_url(out: str, cache: Optional[str]) -> str:
    return cache or f"{out.rstrip('/')}/cache"


@cache_app.command("info")
def cache_info_cmd(out: str = CacheOut, cache: Optional[str] = Cache, json_output: bool = JsonOut) -> None:
    """Models in the cache, with images, batches, layers and bytes."""
    try:
        from infra.cache_admin import cache_info

        infos = cache_info(_cache_url(out, cache))
    except Exception as error:  # noqa: BLE001
        _preflight_error(error)
    if json_output:
        typer.echo(json.dumps([vars(info) for info in infos], indent=2))
        return
    typer.echo(f"cache {_cache_url(out, cache)}: {len(infos)} model(s), "
               f"{sum(i.bytes for i in infos) / 1e6:.1f} MB")
    for info in infos:
        typer.echo(f"  {info.model}: {info.images} image(s), {info.batches} batch(es), "
                   f"{info.bytes / 1e6:.1f} MB, layers {', '.join(info.layers) or '-'}")


@cache_app.command("prune")
def cache_prune_cmd(
    out: str = CacheOut, cache: Optional[str] = Cache,
    model: Optional[str] = typer.Option(None, "--model", help="model fingerprint (model_id) whose entries to delete"),
    older_than: Optional[float] = typer.Option(None, "--older-than", help="delete entries written more than DAYS ago"),
) -> None:
    """Delete a model's entries (--model FP), or entries older than --older-than DAYS (of --model only, if given)."""
    if model is None and older_than is None:
        fail("give --model FP and/or --older-than DAYS")
    try:
        from infra.cache_admin import prune_model, prune_older_than

        url = _cache_url(out, cache)
        if older_than is not None:
            removed, freed = prune_older_than(url, older_than, model=model)
            typer.echo(f"removed {removed} batch(es) older than {older_than:g} day(s), {freed / 1e6:.1f} MB freed")
        else:
            freed = prune_model(url, model)
            typer.echo(f"removed model {model}: {freed / 1e6:.1f} MB freed")
    except Exception as error:  # noqa: BLE001
        _preflight_error(error)


from .report_cmd import report_cmd  # noqa: E402 - a light module (typer only)

app.command("report")(report_cmd)


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
    from .stopping import stop_on_signals

    STATE.json_output = json_output
    clock = PhaseClock()
    api = TemporaryAPI()
    failed = False
    with stop_on_signals(on_exit=api.kill, on_signal=_quiet_after_signal) as control, reported_errors():
        api.start_soon()  # starts while torch loads and the demo's photos are drawn
        from .demo import DemoSettings, prepare_demo, run_demo

        settings = DemoSettings(out=folder, individuals=individuals, top_k=top_k, workers=workers)
        try:
            prepared = prepare_demo(settings)
        except BaseException:
            api.stop()
            raise
        clock.mark("photos")
        _filter_run_logs()
        with api.active(on_lost=control.abort), progress_display(not json_output):
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
    _exit_for(summary, failed)


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
