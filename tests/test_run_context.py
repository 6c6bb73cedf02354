"""One run, one context: the model is resolved and loaded once and the night planned once per run.

The CLI resolves the model before the run starts (its checks); the flow it then runs in the same
process reuses that resolution (and the night it planned) through the run's context instead of
doing the work again. Two runs in one process never see each other's context, and nothing is left
behind when a run ends or fails.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration]

LAYER = "backbone.blocks.3"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return write_night(tmp_path_factory.mktemp("context-night"), 2, seed=4)


class Calls:
    """Counts calls of the functions it wraps, wherever a ``flows`` module imported them."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.counts = monkeypatch, {}

    def spy(self, module, name: str) -> None:
        original = getattr(module, name)
        self.counts[name] = 0

        def counted(*args, **kwargs):
            self.counts[name] += 1
            return original(*args, **kwargs)

        for loaded in [m for key, m in sys.modules.items() if key == module.__name__ or key.startswith("flows.")]:
            if getattr(loaded, name, None) is original:
                self.monkeypatch.setattr(loaded, name, counted)


@pytest.fixture
def calls(monkeypatch, prefect_harness):
    """``resolve_model``, ``plan_uploads`` and model loads (cache misses of ``get_model``) counted;
    an empty model cache, the Prefect API of the test harness."""
    import flows.explain_pairs  # noqa: F401 - every flow module imported before the spies go in
    import flows.night_plan
    import flows.nightly  # noqa: F401
    import flows.preflight
    import flows.reprocess  # noqa: F401
    import flows.run_entry  # noqa: F401
    import infra.model_runtime
    import infra.model_store
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    monkeypatch.setattr(infra.model_runtime, "_MODELS", OrderedDict())
    spies = Calls(monkeypatch)
    spies.spy(flows.preflight, "resolve_model")
    spies.spy(flows.night_plan, "plan_uploads")
    spies.spy(infra.model_store, "load_model")
    return spies.counts


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, args)


def test_a_night_resolves_loads_and_plans_once(calls, night, tmp_path):
    from flows import run_context

    result = _invoke(["nightly", "--uploads", str(night / "uploads"), "--gallery", str(night / "gallery"),
                      "--out", str(tmp_path / "out"), "--model", "demo", "--top-k", "1", "--k-colors", "0",
                      "--k-lines", "3", "--rerank-k", "0", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == {"resolve_model": 1, "plan_uploads": 1, "load_model": 1}
    assert run_context.current() is None  # nothing of the run is left in this process


def test_explain_resolves_and_loads_once(calls, night, tmp_path):
    from flows import run_context

    uploads = sorted((night / "uploads").iterdir())
    table = tmp_path / "pairs.csv"
    table.write_text(f"image_0,image_1\n{uploads[0]},{uploads[1]}\n")
    result = _invoke(["explain", str(table), "--out", str(tmp_path / "out"), "--model", "demo", "--k-colors", "0",
                      "--k-lines", "3", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == {"resolve_model": 1, "plan_uploads": 0, "load_model": 1}
    assert run_context.current() is None


# ------------------------------------------------------------------------------ the context itself
def test_a_context_is_seen_only_inside_its_run_and_thread():
    import threading

    from flows import run_context
    from flows.run_context import RunContext, bound, for_run
    from flows.run_record import FlowSummary

    first = RunContext("nightly", run_id="run-1", summary=FlowSummary(run_id="run-1"))
    seen_elsewhere = []
    with pytest.raises(ZeroDivisionError):
        with bound(first):
            assert for_run("run-1") is first
            with pytest.raises(RuntimeError, match="run-2 is not in progress"):
                for_run("run-2")
            worker = threading.Thread(target=lambda: seen_elsewhere.append(run_context.current()))
            worker.start()
            worker.join()
            with bound(RunContext("explain_pairs", run_id="run-2", summary=FlowSummary(run_id="run-2"))):
                assert for_run("run-2").flow == "explain_pairs"
            assert run_context.current() is first
            raise ZeroDivisionError("a run that fails leaves nothing behind either")
    assert seen_elsewhere == [None]  # another thread (another run) never sees this one's state
    assert run_context.current() is None
    with pytest.raises(RuntimeError):
        for_run("run-1")


def test_the_model_is_resolved_once_per_context(monkeypatch):
    from flows import run_context
    from flows.preflight import ModelPlan
    from flows.run_context import RunContext, bound, model_plan

    resolved = []

    def resolve(config):
        resolved.append(config)
        return ModelPlan(f"model-{len(resolved)}", ("layer",), {})

    monkeypatch.setattr(run_context, "resolve_model", resolve)
    with bound(RunContext("nightly")):
        assert model_plan("config").model_id == model_plan("config").model_id == "model-1"
    with bound(RunContext("nightly")):  # another run resolves its own
        assert model_plan("config").model_id == "model-2"
    assert model_plan("config").model_id == "model-3"  # outside a run: nothing kept
    assert model_plan("config").model_id == "model-4"


# ------------------------------------------------------------------------------ a night planned early
def test_a_night_planned_before_the_lease_is_reused_only_while_its_tables_are_unchanged(night, tmp_path):
    from flows.config import NightlyConfig
    from flows.night_plan import EarlyNight, check_quiet_night, remember_model, reuse_early_night
    from flows.preflight import ModelPlan
    from infra.tables import write_table

    config = NightlyConfig(uploads=str(night / "uploads"), gallery=str(night / "gallery"), out=str(tmp_path / "out"),
                           model="demo", layers=[LAYER])
    model = ModelPlan("model-a", (LAYER,), {"model_spec": "demo"})
    assert check_quiet_night(config).early is None  # no model remembered: nothing planned here
    remember_model(config, model)
    check = check_quiet_night(config)
    assert check.summary is None and not (tmp_path / "out" / "tables" / "runs").exists()
    early = check.early
    assert isinstance(early, EarlyNight) and early.night.has_work and len(early.night.new_uploads) == 2
    assert reuse_early_night(early, config, model) is early.night
    assert reuse_early_night(early, config, ModelPlan("model-b", (LAYER,), {"model_spec": "demo"})) is None
    # another run wrote to a table the plan read (while this one waited for the lease): plan again
    write_table(config.out, "errors", [{"item": "x.png", "stage": "load", "error_type": "E", "message": "m",
                                        "content_hash": None}], "model-a", "other-run")
    assert reuse_early_night(early, config, model) is None


def test_the_run_reuses_the_night_its_command_planned(calls, night, tmp_path):
    """The quiet-night check planned a night with work: the run plans nothing again."""
    from flows.config import NightlyConfig
    from flows.night_plan import check_quiet_night, remember_model
    from flows.nightly import nightly
    from flows.preflight import resolve_model
    from flows.run_context import RunContext, bound
    from infra.tables import read_table

    config = NightlyConfig(uploads=str(night / "uploads"), gallery=str(night / "gallery"), out=str(tmp_path / "out"),
                           model="demo", top_k=1, k_colors=0, k_lines=3, rerank_k=0, workers=0)
    model = resolve_model(config)
    remember_model(config, model)  # as an earlier run on this output did
    check = check_quiet_night(config)
    assert check.summary is None and check.early is not None
    with bound(RunContext("nightly", model=model, early_night=check.early)):
        summary = nightly(config)
    assert summary["done"] == 2
    assert calls == {"resolve_model": 1, "plan_uploads": 1, "load_model": 1}
    assert sorted(read_table(config.out, "candidates")["query"]) == sorted(check.early.night.new_uploads)
