"""SIGTERM and SIGINT stop a run the same way, within a bounded time, wherever it is.

- The first signal raises :class:`flows.outcome.RunTerminated` in the main thread (or Prefect's
  own ``TerminationSignal`` while a flow runs: Prefect then re-sends the signal to this handler
  when the flow has recorded its crash). The run unwinds: outstanding futures are cancelled, the
  ``runs`` row says ``cancelled``, the lease is released, the temporary server and the cluster
  stop.
- If the process is still alive ``grace_s`` seconds later (a task thread that cannot be
  interrupted, a cluster slow to close), or when a second signal arrives, the *stop hooks* run
  from a watcher thread (write the ``cancelled`` row if not written yet, release the lease) and
  the process exits at once with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT).

The watcher learns about every signal through :func:`signal.set_wakeup_fd`, which the
interpreter writes to whichever Python handler is installed (Prefect swaps the SIGTERM handler
while a flow runs). Light module: no Prefect, Dask or torch imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import _thread
from typing import Callable, Iterator

from .outcome import EXIT_CRASHED, RunAborted, RunTerminated

logger = logging.getLogger("pairx.flows")

#: seconds between the first signal and the forced exit
DEFAULT_GRACE_S = 8.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: how long the watcher waits for the main thread to claim a signal as Prefect's re-sent copy
RESENT_WAIT_S = 0.5

_HOOKS: list[Callable[[str, str], None]] = []
_HOOKS_LOCK = threading.Lock()


def exit_code_for(signum: int) -> int:
    """The shell's convention: 128 + the signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


@contextlib.contextmanager
def stop_hook(callback: Callable[[str, str], None]) -> Iterator[None]:
    """Run ``callback(status, error)`` if the process is forced to exit while this block runs
    (``status`` is the ``runs`` status to record: ``cancelled``, or ``crashed`` after :meth:`StopControl.abort`).

    Hooks run from the watcher thread while the main thread may be anywhere: they must be quick,
    thread-safe and idempotent (release a lease, write a row once).
    """
    with _HOOKS_LOCK:
        _HOOKS.append(callback)
    try:
        yield
    finally:
        with _HOOKS_LOCK:
            with contextlib.suppress(ValueError):
                _HOOKS.remove(callback)


class StopControl:
    """The signal handlers, the watcher thread and the forced exit of one command."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, on_exit: Callable[[], None] | None = None,
                 on_signal: Callable[[], None] | None = None):
        self.grace_s = grace_s
        self.on_exit = on_exit
        self.on_signal = on_signal
        self.received: list[int] = []
        self._lock = threading.Lock()
        self._deadline: threading.Timer | None = None
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None
        self._closed = threading.Event()
        self._resent = 0
        self._own_interrupts = 0
        #: why the command aborts itself (:meth:`abort`), e.g. its Prefect server died
        self.abort_reason: str | None = None

    @property
    def signum(self) -> int | None:
        """The first stop signal received, if any."""
        return self.received[0] if self.received else None

    # ---------------------------------------------------------------- main thread
    def _handler(self, signum, frame) -> None:
        if _resent_by_prefect(frame):
            with self._lock:
                self._resent += 1  # the signal already counted, handed on by Prefect's flow engine
        if self.abort_reason is not None:
            raise RunAborted(self.abort_reason)
        raise RunTerminated(signal.Signals(signum).name)

    def abort(self, reason: str) -> None:
        """Stop the run from another thread because it cannot go on (``reason``: one line).

        The main thread gets :class:`RunAborted` (the run is recorded ``crashed``); after the
        grace time the process exits with :data:`EXIT_CRASHED` whatever it is doing.
        """
        if self.abort_reason is not None or self.received or self._closed.is_set():
            return
        self.abort_reason = reason
        with contextlib.suppress(Exception):
            sys.stderr.write(f"error: {reason}; stopping the run\n")
            sys.stderr.flush()
        self._arm_deadline()
        with self._lock:
            self._own_interrupts += 1
        _thread.interrupt_main(signal.SIGINT)

    @property
    def exit_code(self) -> int:
        if self.abort_reason is not None:
            return EXIT_CRASHED
        return exit_code_for(self.signum or signal.SIGTERM)

    def install(self) -> bool:
        """Install handlers and the watcher (main thread only; elsewhere: nothing, returns False)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(True)
        self._writer.setblocking(False)
        try:
            self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        except ValueError:
            self._reader.close()
            self._writer.close()
            return False
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)
        threading.Thread(target=self._watch, name="pairx-stop-watcher", daemon=True).start()
        return True

    def uninstall(self) -> None:
        self._closed.set()
        for signum, previous in self._previous.items():
            with contextlib.suppress(Exception):
                signal.signal(signum, previous)
        self._previous.clear()
        if self._previous_fd is not None:
            with contextlib.suppress(Exception):
                signal.set_wakeup_fd(self._previous_fd)
            self._previous_fd = None
        with self._lock:
            if self._deadline is not None:
                self._deadline.cancel()
        for sock in (self._writer, self._reader):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()

    # ---------------------------------------------------------------- watcher thread
    def _watch(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        with self._lock:
            if self._own_interrupts:  # abort()'s interrupt of the main thread reaches the fd too
                self._own_interrupts -= 1
                return
            self.received.append(signum)
            first = len(self.received) == 1
        if first:
            self._arm_deadline()
            if self.on_signal is not None:
                with contextlib.suppress(Exception):
                    self.on_signal()
            return
        # Prefect's flow engine re-sends the first SIGTERM to this handler once its flow recorded
        # the crash; that copy is not a second signal (the handler, in the main thread, says so)
        self._closed.wait(RESENT_WAIT_S)
        with self._lock:
            if self._resent:
                self._resent -= 1
                return
        self.force_exit("second signal")

    def _arm_deadline(self) -> None:
        with self._lock:
            if self._deadline is None:
                self._deadline = threading.Timer(self.grace_s, self.force_exit, args=("still running",))
                self._deadline.daemon = True
                self._deadline.start()

    def force_exit(self, why: str) -> None:
        """Run the stop hooks and leave now, with the first signal's exit code (3 after :meth:`abort`)."""
        if self._closed.is_set():
            return
        if self.abort_reason is not None:
            status, error = "crashed", f"RunAborted: {self.abort_reason}"
            line = f"error: {self.abort_reason}; stopped ({why}); the run is recorded as crashed"
        else:
            name = signal.Signals(self.signum or signal.SIGTERM).name
            status, error = "cancelled", f"RunTerminated: {name} (forced exit: {why})"
            line = (f"interrupted ({name}, {why}): stopped at once; the run is recorded as cancelled; "
                    "rerun the same command to continue")
        with _HOOKS_LOCK:
            hooks = list(reversed(_HOOKS))
        for hook in hooks:
            try:
                hook(status, error)
            except Exception as failure:  # noqa: BLE001 - the exit must happen
                logger.debug("stop hook failed: %s", failure)
        if self.on_exit is not None:
            with contextlib.suppress(Exception):
                self.on_exit()
        with contextlib.suppress(Exception):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(self.exit_code)


def _resent_by_prefect(frame) -> bool:
    """Whether the signal was raised by Prefect's SIGTERM bridge handing it on (``os.kill`` of itself)."""
    code = getattr(frame, "f_code", None)  # the handler runs in the frame that called os.kill
    return code is not None and code.co_name == "capture_sigterm" and "prefect" in code.co_filename


@contextlib.contextmanager
def stop_on_signals(grace_s: float = DEFAULT_GRACE_S, on_exit: Callable[[], None] | None = None,
                    on_signal: Callable[[], None] | None = None) -> Iterator[StopControl]:
    """SIGTERM/SIGINT handling for one command (see the module docstring); ``on_signal()`` runs
    (in the watcher thread) when the first signal arrives, ``on_exit()`` before a forced exit."""
    control = StopControl(grace_s, on_exit, on_signal)
    control.install()
    try:
        yield control
    finally:
        control.uninstall()
