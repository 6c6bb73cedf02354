"""Light pieces of a run's outcome, importable without Prefect or torch (the CLI uses them first).

- :class:`ItemsFailedError`: a run finished with failed items (its Prefect flow run ends Failed);
- :class:`RunTerminated`: SIGTERM, handled like Ctrl-C (the run is recorded as cancelled);
  :class:`RunAborted`: the CLI stops its own run (recorded as crashed);
- the CLI's exit codes;
- :func:`listen` / :func:`notify`: progress notifications from a run to the CLI's progress bar.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

from pairx_core.errors import PairXError

logger = logging.getLogger("pairx.flows")

#: run statuses written to the ``runs`` table
RUN_STATUSES = ("completed", "failed", "crashed", "cancelled", "refused")

#: exit codes of the CLI (the README's operations table): done; items failed or the output was
#: held by another run; bad input or options (nothing started); the run crashed (``runs.status``
#: ``crashed``); 128 + signal for SIGINT (130) and SIGTERM (143)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASHED = 0, 1, 2, 3


class ItemsFailedError(PairXError):
    """A run finished but some items failed: ends the Prefect flow run ``Failed``.

    ``summary`` is the run's summary (the CLI prints it); ``errors_url`` is where the ``errors``
    rows are.
    """

    def __init__(self, summary: dict, errors_url: str):
        self.summary = summary
        self.errors_url = errors_url
        super().__init__(f"{summary.get('failed')} item(s) failed, {summary.get('done')} done, "
                         f"{summary.get('skipped')} skipped (run {summary.get('run_id')}): see the errors table at "
                         f"{errors_url}")


class RunTerminated(KeyboardInterrupt):
    """SIGTERM or SIGINT received (the CLI turns it into this, so that the run is recorded as cancelled).

    ``args[0]`` is the signal's name (``SIGTERM``).
    """


class RunAborted(RunTerminated):
    """The CLI stops its own run because it cannot go on (e.g. its Prefect server died): ``crashed``."""


_LISTENERS: list[Callable[[Any], None]] = []


@contextlib.contextmanager
def listen(callback: Callable[[Any], None]) -> Iterator[None]:
    """Call ``callback(summary)`` whenever a run in this process makes progress (the CLI's bar)."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def notify(summary: Any) -> None:
    """Tell the listeners that ``summary`` (a ``flows.common.FlowSummary``) changed."""
    for callback in list(_LISTENERS):
        try:
            callback(summary)
        except Exception:  # a display problem never fails a run
            logger.debug("progress listener failed", exc_info=True)
