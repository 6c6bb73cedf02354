"""Flow: explain every pair of a pairs table (CSV or Parquet, local or URL)."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pandas as pd
from prefect import flow, get_run_logger

from infra.cluster import gpu_annotation, make_task_runner
from infra.storage import StorageTarget
from pairx_core.errors import ConfigError
from tasks.explain import PairItem, derive_pair_id, parse_angle, parse_box
from tasks.runtime import model_identity

from . import progress as progress_hooks
from .common import FlowSummary, explain_items, new_run_id, settings_for, write_run
from .config import ExplainPairsConfig


def read_pairs(url: str, image_root: str | None = None, storage_options=None) -> list[PairItem]:
    """Read a pairs table; resolve relative image paths against ``image_root``; derive missing ids."""
    target = StorageTarget.from_url(url, storage_options)
    data = target.read_bytes("")
    if url.endswith((".parquet", ".pq")):
        frame = pd.read_parquet(io.BytesIO(data))
    else:
        frame = pd.read_csv(io.BytesIO(data))
    missing = {"image_0", "image_1"} - set(frame.columns)
    if missing:
        raise ConfigError(f"{url}: pairs table lacks columns {sorted(missing)}")
    root = StorageTarget.from_url(image_root, storage_options) if image_root else None
    items = []
    for row in frame.to_dict("records"):
        uris = []
        for side in ("image_0", "image_1"):
            value = str(row[side])
            uris.append(root.join(value) if root is not None and "://" not in value and not value.startswith("/") else value)
        pair_id = row.get("pair_id")
        pair_id = str(pair_id) if pair_id is not None and not pd.isna(pair_id) else derive_pair_id(*uris)
        items.append(PairItem(pair_id, uris[0], uris[1], parse_box(row.get("box_0")), parse_box(row.get("box_1")),
                              parse_angle(row.get("theta_0")), parse_angle(row.get("theta_1"))))
    ids = [item.pair_id for item in items]
    if len(ids) != len(set(ids)):
        raise ConfigError(f"{url}: duplicate pair_id values")
    return items


def run_pairs(config, items: list[PairItem], flow_name: str) -> FlowSummary:
    """Shared by explain_pairs, nightly and reprocess: batches on the task runner + runs row."""
    started = datetime.now(timezone.utc)
    model_id, _prep = model_identity(config.model, config.storage_options or None)
    summary = FlowSummary(run_id=new_run_id(), model_id=model_id)
    explain_items(items, settings_for(config, summary.run_id), config.batch_pairs, summary,
                  gpu_annotation(config.device), progress_hooks.current())
    write_run(config.out, flow_name, config, summary, started, config.storage_options or None)
    return summary


@flow(name="explain_pairs", log_prints=True)
def explain_pairs(config: ExplainPairsConfig) -> dict:
    """Explain a pairs table; writes pictures and tables under ``config.out``."""
    logger = get_run_logger()
    items = read_pairs(config.pairs, config.image_root, config.storage_options or None)
    logger.info("explaining %d pairs in batches of %d", len(items), config.batch_pairs)
    summary = run_pairs(config, items, "explain_pairs")
    logger.info("summary: %s", summary.as_dict())
    return summary.as_dict()


def run_explain_pairs(config: ExplainPairsConfig) -> dict:
    """Run the flow on the configured Dask cluster (LocalCluster by default)."""
    runner = make_task_runner(config.cluster, config.workers, config.device)
    return explain_pairs.with_options(task_runner=runner)(config)
