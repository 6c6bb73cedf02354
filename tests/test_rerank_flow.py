"""Nightly with two-stage re-ranking: stage 1 for rerank_k candidates from the cache, full PAIR-X
for the top_k only (flows run with ``workers=0`` on the session's Prefect test server)."""

from __future__ import annotations

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration]

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = write_night(tmp_path_factory.mktemp("rerank-photos"), 5, seed=3, uploaders=2)
    return root


def _config(photos, out, **kwargs):
    from flows.config import NightlyConfig

    values = dict(uploads=str(photos / "uploads"), gallery=str(photos / "gallery"), out=str(out), model=MODEL,
                  layers=[LAYER], k_colors=1, k_lines=5, top_k=2, rerank_k=4, workers=0,
                  allow_random_weights=True, report=False)
    return NightlyConfig(**{**values, **kwargs})


def _count_judged(monkeypatch) -> list:
    """The pairs stage 1's task function is called with, appended as they come."""
    import tasks.stage1

    judged = []
    judge = tasks.stage1.stage1_pairs
    monkeypatch.setattr(tasks.stage1, "stage1_pairs",
                        lambda pairs, *a, **k: judged.extend(pairs) or judge(pairs, *a, **k))
    return judged


def test_nightly_reranks_from_the_cache_and_explains_top_k(prefect_harness, photos, tmp_path, monkeypatch):
    import tasks.explain
    import tasks.stage1
    from flows.nightly import nightly
    from infra.tables import read_table

    decodes = {"stage1": 0}
    original = tasks.stage1.load_photo
    monkeypatch.setattr(tasks.stage1, "load_photo",
                        lambda *a, **k: decodes.__setitem__("stage1", decodes["stage1"] + 1) or original(*a, **k))
    judged = _count_judged(monkeypatch)
    out = tmp_path / "out"
    summary = nightly(_config(photos, out))
    assert summary["status"] == "completed" and summary["stage1_pairs"] == len(judged) == 2 * 4
    assert summary["done"] == 2 * 2  # only top_k pairs per upload explained in full
    assert decodes["stage1"] == 0  # stage 1 read activations, decoded nothing
    candidates = read_table(str(out), "candidates")
    assert len(candidates) == 2 * 4
    for _, rows in candidates.groupby("query"):
        assert sorted(rows["rank"]) == [0, 1, 2, 3]
        assert sorted(rows["retrieval_rank"]) == [0, 1, 2, 3]
        assert rows["explained"].sum() == 2
        assert set(rows.loc[rows.explained, "rank"]) == {0, 1}  # the best two after re-ranking
        assert rows.loc[rows.explained, "viz_uri"].notna().all()
        assert rows.loc[~rows.explained, "viz_uri"].isna().all()
        assert rows["n_matches"].notna().all()
    pairs = read_table(str(out), "pairs")
    assert set(pairs.pair_id) == set(candidates.loc[candidates.explained, "pair_id"])
    # stage-1 IRM equals the full explanation's on the explained pairs
    full = pairs.set_index("pair_id")["irm"]
    for row in candidates[candidates.explained].itertuples():
        if row.irm is None or row.irm != row.irm:
            assert full[row.pair_id] is None or full[row.pair_id] != full[row.pair_id]
        else:
            assert full[row.pair_id] == pytest.approx(row.irm, rel=1e-4)
    pictures = list((out / "viz").rglob("*.png"))
    assert len(pictures) == 4
    assert read_table(str(out), "runs").cache_misses.iloc[0] == 7


@pytest.mark.parametrize("rerank_k", [0, 1, 2])
def test_rerank_off_keeps_top_k_only(prefect_harness, photos, tmp_path, monkeypatch, rerank_k):
    """0 turns re-ranking off; so does a rerank_k not above top_k (2): stage 1 would judge only
    the pairs the engine explains, and a smaller one must not explain fewer than top_k."""
    from flows.nightly import nightly
    from infra.tables import read_table

    judged = _count_judged(monkeypatch)
    out = tmp_path / "out"
    summary = nightly(_config(photos, out, rerank_k=rerank_k, k_colors=0))
    assert summary["status"] == "completed" and summary["done"] == 4
    assert judged == [] and "stage1_pairs" not in summary
    assert (summary.get("rerank") or "").startswith("off: rerank_k") == (rerank_k > 0)
    candidates = read_table(str(out), "candidates")
    assert len(candidates) == 4
    assert candidates["retrieval_rank"].isna().all() and candidates["explained"].isna().all()
    for _, rows in candidates.groupby("query"):
        assert sorted(rows["rank"]) == [0, 1] and rows["viz_uri"].notna().all()
