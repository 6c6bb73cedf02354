"""Flow: re-explain every pair recorded under an output location with a new model.

New results land in the new model's partitions; the old model's stay untouched.
"""

from __future__ import annotations

from prefect import flow

from infra.inputs import PairItem, parse_angle, parse_box
from infra.tables import read_table

from .common import run_recorded
from .config import ReprocessConfig
from .explain_pairs import explain_recorded_items
from .reprocess_plan import gallery_individuals
from .run_context import model_plan


def recorded_pairs(config: ReprocessConfig, new_model_id: str) -> list[PairItem]:
    so = config.storage_options or None
    pairs = read_table(config.out, "pairs", columns=["pair_id", "image_0", "image_1", "model_id", "box_0", "box_1",
                                                     "theta_0", "theta_1"], storage_options=so)
    if config.old_model:
        pairs = pairs[pairs.model_id == config.old_model]
    pairs = pairs[pairs.model_id != new_model_id].drop_duplicates("pair_id")
    individuals = gallery_individuals(config.out, so)  # named on the new pictures, as the first run did
    return [PairItem(r.pair_id, r.image_0, r.image_1, parse_box(r.box_0), parse_box(r.box_1),
                     parse_angle(r.theta_0), parse_angle(r.theta_1), individual_1=individuals.get(r.image_1))
            for r in pairs.itertuples(index=False)]


@flow(name="reprocess-work", log_prints=True)
def reprocess_work(config: ReprocessConfig, run_id: str) -> None:
    plan = model_plan(config)
    explain_recorded_items(config, recorded_pairs(config, plan.model_id), run_id, plan)


@flow(name="reprocess", log_prints=True)
def reprocess(config: ReprocessConfig) -> dict:
    """Re-explain every recorded pair with a new model on the Dask cluster the config names."""
    return run_recorded("reprocess", config, reprocess_work)
