"""Flow: explain every pair of a pairs table (CSV or Parquet, local or URL).

``explain_pairs`` is the entry flow (CLI and deployments); ``explain_pairs_work`` runs on the
Dask task runner the config asks for (see ``flows.common``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from infra.cluster import gpu_annotation
from infra.inputs import PairItem, listed_sizes, read_pairs
from infra.keys import once_per_content
from infra.records import refused_pair_row
from infra.tables import write_table

from .common import active_summary, explain_items, notify, run_recorded, settings_for
from .config import ExplainPairsConfig
from .preflight import ModelPlan, check_pairs_paths, pairs_rules
from .run_context import model_plan


def explain_recorded_items(config, items: list[PairItem], run_id: str, plan: ModelPlan | None = None,
                           sizes: dict[str, int | None] | None = None) -> None:
    """Shared by explain_pairs and reprocess: the run's model (unless given), fan the batches out.

    Pairs whose images repeat another pair's contents (other names) are explained once, whatever
    batches they would land in, and counted as skipped.
    """
    summary = active_summary(run_id)
    items, duplicates = once_per_content(items, config.storage_options or None, sizes)
    if duplicates:
        summary.skipped += len(duplicates)
        get_run_logger().info("%d pair(s) repeat the contents of another pair: explained once (%s)",
                              len(duplicates), ", ".join(item.pair_id for item in duplicates[:5]))
    plan = plan or model_plan(config)
    summary.model_id, summary.model_facts = plan.model_id, plan.facts
    summary.planned = {"pairs_planned": len(items)}
    notify(summary)
    get_run_logger().info("explaining %d pairs in batches of %d with model %s, layer %s", len(items),
                          config.batch_pairs, plan.facts["model_spec"], ",".join(plan.layers))
    explain_items(items, settings_for(config, run_id, plan.layers), config.batch_pairs, summary,
                  gpu_annotation(config.device))


@flow(name="explain-pairs-work", log_prints=True)
def explain_pairs_work(config: ExplainPairsConfig, run_id: str) -> None:
    so = config.storage_options or None
    items = read_pairs(config.pairs, config.image_root, so, pairs_rules(config))
    readable = [item for item in items if item.refusal is None]
    sizes = listed_sizes([uri for item in readable for uri in (item.image_0, item.image_1)], so)
    check_pairs_paths(config, items, sizes)  # deployments too: too many missing images stop here
    refused = [item for item in items if item.refusal is not None]
    if refused:  # URLs and paths outside the image root: an errors row each, never read
        plan = model_plan(config)
        write_table(config.out, "errors", [refused_pair_row(item.pair_id, item.refusal, run_id) for item in refused],
                    plan.model_id, run_id, so)
        active_summary(run_id).failed += len(refused)
    else:
        plan = None
    explain_recorded_items(config, readable, run_id, plan, sizes)


@flow(name="explain_pairs", log_prints=True)
def explain_pairs(config: ExplainPairsConfig) -> dict:
    """Explain a pairs table on the Dask cluster the config names; pictures and tables under ``out``."""
    return run_recorded("explain_pairs", config, explain_pairs_work)
