"""One run sequence for every command that runs a flow, and how a command ends.

:func:`command_guard` is around every such command: SIGTERM/SIGINT handling
(``flows.stopping``) and :func:`reported_errors` (every way out is one ``error:`` line and an
exit code). :func:`run_flow` runs an entry flow with the Prefect API, the progress bar and the
phase clock. :func:`run_command` is ``explain``/``nightly``/``reprocess``: checks, then
:func:`run_flow`, then the summary and the exit code; ``demo`` uses the same two pieces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Callable, Iterator

import typer

from infra.prefect_server import TemporaryAPI
from infra.storage import OutputLayout

from .console import PhaseClock, failed_items, human_summary, print_summary, progress_display  # noqa: F401

EXIT_FAILED, EXIT_USAGE, EXIT_CRASHED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143


class _State:
    log_level: str = "WARNING"
    debug: bool = False
    #: the command's --json: errors are also printed on stdout as a JSON object
    json_output: bool = False


STATE = _State()


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
        hint = "" if STATE.debug else "; --debug shows the traceback"
        fail(f"{_one_line(error)} (the run is recorded as crashed{hint})",
             code=EXIT_CRASHED)


def _preflight_error(error: BaseException) -> None:
    """Bad input found before the run: exit code 2 (``--debug``: plus the traceback)."""
    from pydantic import ValidationError

    _traceback_if_debug(error)
    if isinstance(error, ValidationError):
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()))
    fail(_one_line(error))


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


@contextlib.contextmanager
def command_guard(api: TemporaryAPI, json_output: bool) -> Iterator:
    """Signals and errors of one command that runs a flow; yields the :class:`flows.stopping.StopControl`."""
    from .stopping import stop_on_signals

    STATE.json_output = json_output
    with stop_on_signals(on_exit=api.kill, on_signal=_quiet_after_signal) as control, reported_errors():
        yield control


def run_flow(call: Callable[[], dict], api: TemporaryAPI, control, clock: PhaseClock,
             json_output: bool) -> tuple[dict, bool]:
    """``call()`` (an entry flow) with the API up and the progress bar; ``(summary, items failed)``."""
    from .outcome import ItemsFailedError

    from prefect import tags

    from infra.prefect_server import mark_abandoned_runs_crashed, process_tags

    failed = False
    _filter_run_logs()
    with api.active(on_lost=control.abort), progress_display(not json_output):
        clock.mark("prefect_api")
        abandoned = mark_abandoned_runs_crashed()
        if abandoned:
            logging.getLogger("pairx.cli").warning("marked %d flow run(s) of killed pairx commands as crashed",
                                                   abandoned)
        try:
            with tags(*process_tags()):
                summary = call()
        except ItemsFailedError as error:
            summary, failed = error.summary, True
        clock.mark("flow")
    clock.mark("shutdown")
    return summary, failed


def run_command(flow: str, config, entry_module: str, json_output: bool) -> None:
    """Check inputs, start the API, run the entry flow, print the summary, exit with its code.

    The entry flow's module (Prefect, torch, ...) is imported only after the cheap checks passed.
    """
    from importlib import import_module

    from infra.redaction import hide_model_secrets

    from .night_plan import QuietCheck, remember_model
    from .preflight import check_inputs, check_model_spec, resolve_model
    from .run_context import RunContext, bound

    clock = PhaseClock()
    api = TemporaryAPI()
    with command_guard(api, json_output) as control:
        try:
            plan = check_inputs(flow, config)
            typer.echo(plan.describe(config), err=True)
            clock.mark("checks")
            # before the model spec's own check, which imports torch: only a spec that passed every
            # check on an earlier run of this output is remembered
            quiet = _quiet_night(config) if flow == "nightly" and api.needed else QuietCheck()
            if quiet.summary is not None:
                clock.mark("quiet_night")
                print_summary(flow, quiet.summary, clock, config, json_output)
                return
            api.start_soon()  # the server starts while torch and the model load (stopped if a check fails)
            # imports torch: after the quiet-night short path, which must not
            from pairx_core.runtime_settings import configure_task_process

            configure_task_process()  # this process runs tasks too (--workers 0, the model checks)
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
        # the flow runs in this process: it reuses what the checks resolved and planned
        with bound(RunContext(flow, model=model, early_night=quiet.early)):
            summary, failed = run_flow(lambda: entry(config), api, control, clock, json_output)
    if failed:
        summary["errors_table"] = OutputLayout(config.out).table("errors")
        summary["failed_items"] = failed_items(config, summary["run_id"])
    print_summary(flow, summary, clock, config, json_output)
    exit_for(summary, failed)


def exit_for(summary: dict, failed: bool) -> None:
    """Exit 1 for failed items (after their list), 3 for a run recorded as crashed."""
    if summary.get("status") == "crashed":
        raise typer.Exit(code=EXIT_CRASHED)
    if failed:
        raise typer.Exit(code=EXIT_FAILED)


def _quiet_night(config):
    """A night with nothing new for a model seen before on this output, recorded without Prefect
    or torch (``flows.night_plan.check_quiet_night``); without its summary the normal path runs
    (and reports any problem), reusing the night planned here when it still holds."""
    from .night_plan import QuietCheck, check_quiet_night

    try:
        return check_quiet_night(config)
    except Exception as error:  # noqa: BLE001 - the normal path checks and reports properly
        logging.getLogger("pairx.cli").debug("quiet-night short path not taken: %s", error)
        return QuietCheck()
