"""Re-ranking (pairx_core.retrieval), model-spec redaction and public links."""

from __future__ import annotations

import math

import pytest

from infra.model_store import redact_model_spec
from infra.records import candidate_rows
from infra.viz import public_link
import numpy as np

from pairx_core.retrieval import Candidate, PairOutcome, best_reranked, rank_candidates, rerank_score, retrieve


def test_rerank_score_falls_back_to_similarity_without_irm():
    assert rerank_score(0.8, 0.4) == pytest.approx(0.6)
    for undefined in (None, float("nan"), math.inf):
        assert rerank_score(0.8, undefined) == pytest.approx(0.8)


def test_rank_candidates_orders_each_query_and_records_the_explanation():
    candidates = [
        Candidate("q1", "g1", 0.90, "p11", "ann"),
        Candidate("q1", "g2", 0.85, "p12", "bob"),
        Candidate("q1", "g3", 0.80, "p13", None),
        Candidate("q2", "g1", 0.50, "p21", "ann"),
    ]
    outcomes = {
        "p11": PairOutcome("blocks.3", irm=0.1, viz_uri="v11", output_key="k11"),  # 0.50
        "p12": PairOutcome("blocks.3", irm=0.9, viz_uri="v12", output_key="k12"),  # 0.875
        "p13": PairOutcome("blocks.3", irm=0.5, viz_uri="v13", output_key="k13"),  # 0.65
    }
    rows = candidate_rows(rank_candidates(candidates, outcomes), "demo")
    q1 = [r for r in rows if r["query"] == "q1"]
    assert [r["gallery_image"] for r in q1] == ["g2", "g3", "g1"]
    assert [r["rank"] for r in q1] == [0, 1, 2]
    assert [r["rerank_score"] for r in q1] == pytest.approx([0.875, 0.65, 0.50])
    assert q1[0]["output_key"] == "k12" and q1[0]["viz_uri"] == "v12" and q1[0]["layer"] == "blocks.3"
    assert q1[0]["pair_id"] == "p12" and q1[0]["individual"] == "bob" and q1[0]["model_spec"] == "demo"
    (q2,) = [r for r in rows if r["query"] == "q2"]  # not explained: similarity, no join keys
    assert q2["rank"] == 0 and q2["rerank_score"] == pytest.approx(0.5)
    assert q2["irm"] is None and q2["output_key"] is None and q2["pair_id"] == "p21"


def test_an_upload_with_a_pair_without_irm_keeps_retrieval_order():
    """Similarity alone (0.95) must not outrank blended scores (about 0.5) of the other candidates."""
    candidates = [Candidate("q", "true", 0.99, "a", "jel"), Candidate("q", "few", 0.96, "b", "val"),
                  Candidate("q", "other", 0.94, "c", "apr")]
    outcomes = {"a": PairOutcome("l", irm=0.08), "b": PairOutcome("l", irm=None), "c": PairOutcome("l", irm=0.01)}
    rows = candidate_rows(rank_candidates(candidates, outcomes), None)
    assert [r["gallery_image"] for r in rows] == ["true", "few", "other"]
    assert [r["rerank_score"] for r in rows] == pytest.approx([0.99, 0.96, 0.94])
    assert [r["irm"] for r in rows] == [0.08, None, 0.01]  # the IRMs that exist are still recorded
    outcomes["b"] = PairOutcome("l", irm=0.9)  # all defined: blended again
    assert [r.candidate.gallery_image for r in rank_candidates(candidates, outcomes)] == ["few", "true", "other"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("miewid?weights=s3://bucket/w.safetensors&size=440", "miewid?weights=s3://bucket/w.safetensors&size=440"),
    ("timm:efficientnet_b0?size=128", "timm:efficientnet_b0?size=128"),
    ("miewid?weights=s3://AKIAXX:s3cr3t@bucket/w.safetensors", "miewid?weights=s3://***@bucket/w.safetensors"),
    ("miewid?weights=https://host/w.pt?X-Amz-Signature=abc&X-Amz-Credential=AKIA%2F1&size=440",
     "miewid?weights=https://host/w.pt?X-Amz-Signature=***&X-Amz-Credential=***&size=440"),
    ("hf://org/repo?token=hf_abc&revision=main", "hf://org/repo?token=***&revision=main"),
    ("python:mod:factory?api_key=1&password=2", "python:mod:factory?api_key=***&password=***"),
])
def test_redact_model_spec(spec, expected):
    redacted = redact_model_spec(spec)
    assert redacted == expected
    for secret in ("s3cr3t", "AKIAXX", "hf_abc", "abc&", "=1&", "=2"):
        if secret not in expected:
            assert secret not in redacted


def test_public_link(tmp_path):
    out = str(tmp_path / "out")
    picture = f"{out}/viz/model=ab12/p1/blocks.3.png"
    assert public_link(out, picture, "https://cdn.example/night/") == "https://cdn.example/night/viz/model=ab12/p1/blocks.3.png"
    assert public_link(out, picture, None) == picture
    assert public_link(out, "/elsewhere/x.png", "https://cdn.example") == "/elsewhere/x.png"


def test_top_k_is_cosine_and_stable():
    import numpy as np

    from pairx_core.retrieval import cosine_similarities, top_k

    gallery = np.array([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    query = np.array([[2.0, 0.1], [0.0, -1.0]], dtype=np.float32)
    order, scores = top_k(query, gallery, 3)
    # scale does not matter (cosine), ties keep gallery order: rows 0 and 1 are equal
    assert order[0].tolist() == [0, 1, 3]
    assert scores[0, 0] == pytest.approx(2.0 / math.hypot(2.0, 0.1), rel=1e-6)
    assert order[1, -1] != 2 and scores[1, 0] == pytest.approx(0.0)  # the zero vector scores 0, not NaN
    assert np.isfinite(cosine_similarities(query, gallery)).all()
    order, _ = top_k(query, gallery, 10)  # k larger than the gallery
    assert order.shape == (2, 5)
    exclude = np.zeros((2, 5), dtype=bool)
    exclude[0, 0] = True
    order, scores = top_k(query, gallery, 2, exclude=exclude)
    assert order[0].tolist() == [1, 3]


@pytest.mark.parametrize("k", [1, 3, 20, 50])
def test_top_k_selects_exactly_what_a_full_stable_sort_would(k):
    """The partial selection equals the first k of a stable argsort: ties (also at the k-th
    place), excluded entries, NaN rows, k near the gallery's size."""
    from pairx_core.retrieval import _stable_top

    rng = np.random.default_rng(k)
    scores = rng.integers(0, 12, size=(40, 200)).astype(np.float32) / 11  # many ties everywhere
    scores[1] = 0.5  # a row of one value
    scores[2, rng.choice(200, 150, replace=False)] = -np.inf  # mostly excluded
    scores[3, 7] = np.nan
    scores[4] = rng.standard_normal(200)  # no ties
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    assert np.array_equal(_stable_top(scores, k), expected)
    assert _stable_top(scores, 0).shape == (40, 0)


def test_retrieve_builds_candidates_and_best_reranked_chooses_by_score():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    query = np.array([[1.0, 0.1], [0.1, 1.0]])
    individuals = {"g0": "A", "g1": "", "g2": "C"}
    candidates, ranks = retrieve(query, gallery, ["q0", "q1"], ["g0", "g1", "g2"], individuals, 2,
                                 lambda a, b: f"{a}|{b}")
    assert [(c.query, c.gallery_image, c.individual) for c in candidates] == [
        ("q0", "g0", "A"), ("q0", "g2", "C"), ("q1", "g1", None), ("q1", "g2", "C")]
    assert ranks == {"q0|g0": 0, "q0|g2": 1, "q1|g1": 0, "q1|g2": 1}
    assert candidates[0].similarity == pytest.approx(1 / math.hypot(1.0, 0.1))
    # a strong IRM lifts q0's second candidate above its first; q1 lacks an IRM: similarity order
    irm = {"q0|g0": 0.0, "q0|g2": 1.0, "q1|g1": None, "q1|g2": 1.0}
    assert best_reranked(candidates, irm, 1) == ["q0|g2", "q1|g1"]
