"""Flow: re-explain every pair recorded under an output location with a new model.

New results land in the new model's partitions; the old model's stay untouched.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from infra.cluster import make_task_runner
from infra.tables import read_table
from tasks.explain import PairItem, parse_angle, parse_box
from tasks.runtime import model_identity

from .config import ReprocessConfig
from .explain_pairs import run_pairs


def recorded_pairs(config: ReprocessConfig, new_model_id: str) -> list[PairItem]:
    so = config.storage_options or None
    pairs = read_table(config.out, "pairs", columns=["pair_id", "image_0", "image_1", "model_id", "box_0", "box_1",
                                                     "theta_0", "theta_1"], storage_options=so)
    if config.old_model:
        pairs = pairs[pairs.model_id == config.old_model]
    pairs = pairs[pairs.model_id != new_model_id].drop_duplicates("pair_id")
    return [PairItem(r.pair_id, r.image_0, r.image_1, parse_box(r.box_0), parse_box(r.box_1),
                     parse_angle(r.theta_0), parse_angle(r.theta_1))
            for r in pairs.itertuples(index=False)]


@flow(name="reprocess", log_prints=True)
def reprocess(config: ReprocessConfig) -> dict:
    logger = get_run_logger()
    new_model_id, _ = model_identity(config.model, config.storage_options or None)
    items = recorded_pairs(config, new_model_id)
    logger.info("re-explaining %d recorded pairs with model %s", len(items), new_model_id)
    summary = run_pairs(config, items, "reprocess")
    return summary.as_dict()


def run_reprocess(config: ReprocessConfig) -> dict:
    runner = make_task_runner(config.cluster, config.workers, config.device)
    return reprocess.with_options(task_runner=runner)(config)
