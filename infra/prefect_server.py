"""Prefect's API for one command: ``PREFECT_API_URL`` if set, else a temporary local server.

The temporary server (uvicorn, SQLite under ``PREFECT_HOME``) is a child of the command's
process, started from the main thread with ``PR_SET_PDEATHSIG`` so that it dies with the command
however the command dies (SIGKILL too). Its start-up overlaps with loading torch and the model
(:meth:`TemporaryAPI.start_soon`); :meth:`TemporaryAPI.watch` tells the command at once if it
dies mid-run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Iterator

__all__ = ["OwnedServer", "TEMPORARY_SERVER_ENV", "TemporaryAPI", "flush_logs", "prefect_api"]


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
                flush_logs()  # (a dead server takes no logs: flushing would wait for nothing)
            os.environ.pop("PREFECT_API_URL", None)
            self.stop()


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Use PREFECT_API_URL if set, else a temporary local server shared with the workers."""
    with TemporaryAPI().active():
        yield


def flush_logs() -> None:
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


# ------------------------------------------------------------------------------ run history
#: tags of every flow run a CLI command starts: which process ran it, so that a later command can
#: tell a run whose process died (SIGKILL, power loss) from one still running
HOST_TAG, PID_TAG = "pairx-host:", "pairx-pid:"


def process_tags() -> list[str]:
    """``pairx-host:<host>``, ``pairx-pid:<pid>@<process start, epoch s>`` of this process."""
    import socket

    import psutil

    started = int(psutil.Process().create_time())
    return [f"{HOST_TAG}{socket.gethostname()}", f"{PID_TAG}{os.getpid()}@{started}"]


def _process_alive(tag_value: str) -> bool:
    import psutil

    pid, _, started = tag_value.partition("@")
    try:
        process = psutil.Process(int(pid))
        return not started or abs(process.create_time() - int(started)) < 2
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.Error:  # access denied: alive, someone else's
        return True


def mark_abandoned_runs_crashed(limit: int = 200) -> int:
    """Mark ``Crashed`` the running flow runs of this host's dead CLI processes; returns how many.

    Such a run's process was killed without a chance to report (its ``runs`` row is missing or
    says ``running`` nowhere: the ``runs`` table only gets rows from processes that could write
    them). Best effort: any API problem leaves the history as it was.
    """
    import socket

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host_tag = f"{HOST_TAG}{socket.gethostname()}"
    marked = 0
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING])),
                tags=FlowRunFilterTags(all_=[host_tag])), limit=limit)
            for run in runs:
                pids = [tag[len(PID_TAG):] for tag in run.tags if tag.startswith(PID_TAG)]
                if not pids or _process_alive(pids[0]):
                    continue
                client.set_flow_run_state(run.id, Crashed(
                    message=f"the pairx command that ran it (pid {pids[0].partition('@')[0]}) ended without "
                            "reporting; marked crashed by the next command on this host"), force=True)
                marked += 1
    except Exception as error:  # noqa: BLE001 - history upkeep never stops a run
        logging.getLogger("pairx.cli").debug("could not check for abandoned flow runs: %s", error)
    return marked
