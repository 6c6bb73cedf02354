"""What one run knows in this process, from the command's checks to the run's record.

A :class:`RunContext` is created once per run: by the CLI's run entry (``flows.run_entry``) before
it starts the entry flow, holding what its checks already resolved (the model, a night planned by
the quiet-night check), or by the entry flow itself (``flows.common.run_recorded``) when nothing
made one (a deployment, ``pairx demo``). The entry flow adds the run id and the summary; the work
flow reads them, and the model and night plans, from it instead of resolving and planning again.

It lives in a :class:`contextvars.ContextVar` bound for the duration of the run (:func:`bound`):
Prefect flow parameters stay JSON (config and run id, never a model or credentials), two runs in
one process (threads, or one after the other) each see their own, and nothing is left once the
run ends or fails. A work flow checks that the context it sees is its run's (:func:`for_run`).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .preflight import ModelPlan, resolve_model

if TYPE_CHECKING:  # planning imports the tables; the context itself needs none of it
    from .night_plan import EarlyNight, NightPlan
    from .run_record import FlowSummary


@dataclass
class RunContext:
    """One run's state in this process (see the module docstring); never a Prefect parameter."""

    flow: str
    #: the model as the CLI's checks resolved it (``None``: the flow resolves it, once)
    model: ModelPlan | None = None
    #: a night planned before the run took the output's lease (the quiet-night check), reused when
    #: the tables it read are unchanged once the lease is held (``flows.night_plan.reuse_early_night``)
    early_night: EarlyNight | None = None
    #: set by the entry flow when the run starts
    run_id: str | None = None
    summary: FlowSummary | None = None
    #: the night as the entry flow planned it, for its work flow
    night: NightPlan | None = None


_CURRENT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("pairx_run_context", default=None)


def current() -> RunContext | None:
    """The context of the run in progress in this thread (``None`` outside a run)."""
    return _CURRENT.get()


@contextlib.contextmanager
def bound(context: RunContext) -> Iterator[RunContext]:
    """``context`` is :func:`current` inside the block, whatever way the block is left."""
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def for_run(run_id: str) -> RunContext:
    """The context of run ``run_id``; a work flow started outside its entry flow has none."""
    context = current()
    if context is None or context.run_id != run_id or context.summary is None:
        raise RuntimeError(f"run {run_id} is not in progress in this process: start a work flow through its "
                           "entry flow (nightly, explain_pairs, reprocess)")
    return context


def model_plan(config: Any) -> ModelPlan:
    """The run's model: resolved once per run (:func:`flows.preflight.resolve_model`), then reused."""
    context = current()
    if context is not None and context.model is not None:
        return context.model
    plan = resolve_model(config)
    if context is not None:
        context.model = plan
    return plan
