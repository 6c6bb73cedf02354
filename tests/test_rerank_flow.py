"""Nightly with two-stage re-ranking: the top_k most similar explained in full, stage 1 from the
cache for the other candidates, the final top_k explained (flows run with ``workers=0`` on the
session's Prefect test server)."""

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
    # the top 2 by similarity are explained, never judged: stage 1 judges the other 2 of each upload
    assert summary["status"] == "completed" and summary["stage1_pairs"] == len(judged) == 2 * 2
    assert decodes["stage1"] == 0  # stage 1 read activations, decoded nothing
    candidates = read_table(str(out), "candidates")
    assert len(candidates) == 2 * 4
    assert set(p.pair_id for p in judged) == set(candidates.loc[candidates.retrieval_rank >= 2, "pair_id"])
    lifted = 0
    for _, rows in candidates.groupby("query"):
        assert sorted(rows["rank"]) == [0, 1, 2, 3]
        assert sorted(rows["retrieval_rank"]) == [0, 1, 2, 3]
        assert rows.loc[rows["rank"] < 2, "explained"].all()  # the final top 2 are explained
        assert rows.loc[rows.retrieval_rank < 2, "explained"].all()  # and the first two by similarity
        explained = rows.loc[rows.explained]
        lifted += int(((explained.retrieval_rank >= 2)).sum())
        assert len(explained) == 2 + int((explained.retrieval_rank >= 2).sum())
        assert explained["viz_uri"].notna().all()
        assert rows.loc[~rows.explained, "viz_uri"].isna().all()
        assert rows["n_matches"].notna().all()  # stage 1's or the explanation's
    assert summary["done"] == 2 * 2 + lifted
    pairs = read_table(str(out), "pairs")
    assert set(pairs.pair_id) == set(candidates.loc[candidates.explained, "pair_id"])
    # the candidates' metrics of explained pairs are their explanations'
    full = pairs.set_index("pair_id")
    for row in candidates[candidates.explained].itertuples():
        assert full.loc[row.pair_id, "n_matches"] == row.n_matches
        if row.irm is None or row.irm != row.irm:
            assert full.loc[row.pair_id, "irm"] != full.loc[row.pair_id, "irm"]
        else:
            assert full.loc[row.pair_id, "irm"] == pytest.approx(row.irm, rel=1e-4)
    pictures = list((out / "viz").rglob("*.png"))
    assert len(pictures) == 2 * 2 + lifted
    assert read_table(str(out), "runs").cache_misses.iloc[0] == 7


def test_a_candidate_lifted_by_stage_1_is_explained(prefect_harness, photos, tmp_path, monkeypatch):
    """Stage 1 says the least similar candidate of each upload is the most plausible: it enters
    the final top 2 and is explained in a second round; the one it displaced keeps its picture."""
    import flows.rerank
    import tasks.stage1
    from flows.nightly import nightly
    from infra.tables import read_table

    judge = tasks.stage1.stage1_pairs

    def favour_the_last(pairs, *args, **kwargs):
        summary = judge(pairs, *args, **kwargs)
        for metrics in summary.metrics.values():
            metrics["irm"] = -1.0  # below anything an explanation gives
        last = {}
        for pair in pairs:
            last[pair.query] = pair.pair_id
        for pair_id in last.values():
            summary.metrics[pair_id]["irm"] = 1e6
        return summary

    monkeypatch.setattr(tasks.stage1, "stage1_pairs", favour_the_last)
    read_back = flows.rerank.explained_metrics

    def defined(*args, **kwargs):  # this tiny model finds too few matches for an IRM: a query with
        metrics = read_back(*args, **kwargs)  # an undefined one would be ranked by similarity alone
        return {pid: {**m, "irm": 0.0 if m["irm"] is None else m["irm"]} for pid, m in metrics.items()}

    monkeypatch.setattr(flows.rerank, "explained_metrics", defined)
    out = tmp_path / "out"
    summary = nightly(_config(photos, out))
    assert summary["status"] == "completed" and summary["done"] == 2 * 3 and summary["pairs_planned"] == 2 * 3
    candidates = read_table(str(out), "candidates")
    for _, rows in candidates.groupby("query"):
        last = rows[rows.retrieval_rank == 3].iloc[0]
        assert last["rank"] == 0 and last["explained"] and isinstance(last["viz_uri"], str)
        assert rows.loc[rows.retrieval_rank < 2, "explained"].all()  # explained first, kept
        assert set(rows.loc[rows.explained, "retrieval_rank"]) == {0, 1, 3}
        assert rows.loc[rows.retrieval_rank == 2, "viz_uri"].isna().all()
        assert (rows["top_k"] == 2).all()
    assert len(list((out / "viz").rglob("*.png"))) == 2 * 3
    # reviewers see the final top 2 only: the displaced candidate keeps its picture but no card
    from infra.report.data import load_nights
    night, = load_nights(str(out))
    assert [sorted(card.rank for card in upload.cards) for upload in night.uploads] == [[0, 1], [0, 1]]
    for upload in night.uploads:
        ranked = candidates[candidates["query"] == upload.photo.uri].set_index("rank")
        assert ranked.loc[0, "retrieval_rank"] == 3  # the lifted one heads the cards
    # the dashboards' view: every judged candidate with its metrics, the displaced one outside top_k
    import duckdb

    from infra.views import create_views
    con = create_views(duckdb.connect(), str(out))
    rows = con.sql("SELECT retrieval_rank, explained, in_top_k, n_matches IS NOT NULL FROM candidate_review "
                   "ORDER BY query, rank").fetchall()
    assert len(rows) == 2 * 4 and all(has_matches for *_, has_matches in rows)
    assert sorted((r[1], r[2]) for r in rows) == sorted(([(True, True)] * 2 + [(True, False), (False, False)]) * 2)
    displaced = [r[0] for r in rows if r[1] and not r[2]]
    assert len(displaced) == 2 and set(displaced) <= {0, 1}


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
