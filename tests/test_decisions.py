"""Reviewer decisions: the table, the checks shared by the API and `pairx decide`, the API, the views."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from decision_helpers import MODEL, NIGHT_RUN, gallery_uri, query_uri, write_output
from flows.cli import app
from infra.decisions import (DecisionConflictError, DecisionError, DecisionRequest, UnknownUploadError,
                             read_decisions, record_decisions)
from infra.views import create_views

runner = CliRunner()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return write_output(tmp_path / "out")


def _request(**fields) -> DecisionRequest:
    return DecisionRequest.from_mapping({"reviewer": "ana", **fields})


# ---------------------------------------------------------------------------- table and checks
def test_decisions_are_appended_and_the_latest_supersedes(out):
    q = query_uri(out, 0)
    first, = record_decisions(str(out), [_request(query=q, decision="match", rank=1)])
    assert first["individual"] == "ind-b" and first["gallery_image"] == gallery_uri(out, "ind-b")
    assert (first["rank"], first["retrieval_rank"], first["similarity"], first["rerank_score"]) == (1, 0, 0.9, 0.6)
    assert first["night_run_id"] == NIGHT_RUN and first["model_id"] == MODEL and first["content_hash"] == f"{0:064x}"
    assert first["box"] == [2.0, 3.0, 30.0, 20.0]
    second, third = record_decisions(str(out), [_request(query=q, decision="no_match"),
                                                _request(query=q, decision="undo")])
    assert second["supersedes"] == first["decision_id"] and third["supersedes"] == second["decision_id"]
    frame = read_decisions(str(out))
    assert list(frame["decision"]) == ["match", "no_match", "undo"]  # rows stay
    with pytest.raises(DecisionConflictError, match="no decision to undo"):
        record_decisions(str(out), [_request(query=q, decision="undo")])


@pytest.mark.parametrize("fields, error, message", [
    ({"query": "/elsewhere/x.png", "decision": "no_match"}, UnknownUploadError, "unknown upload"),
    ({"decision": "no_match"}, DecisionError, "query is required"),
    ({"query": "Q", "decision": "maybe"}, DecisionError, "decision must be one of"),
    ({"query": "Q", "decision": "match"}, DecisionError, "needs the accepted candidate"),
    ({"query": "Q", "decision": "match", "rank": 7}, DecisionError, "no such candidate"),
    ({"query": "Q", "decision": "match", "rank": -1}, DecisionError, "rank must be"),
    ({"query": "Q", "decision": "match", "individual": "nobody"}, DecisionError, "unknown individual"),
    ({"query": "Q", "decision": "new_individual"}, DecisionError, "needs the new individual's name"),
    ({"query": "Q", "decision": "new_individual", "individual": "ind-a"}, DecisionConflictError, "already exists"),
    ({"query": "Q", "decision": "no_match", "rank": 0}, DecisionError, "takes no candidate"),
    ({"query": "Q", "decision": "no_match", "model_id": "gone"}, DecisionConflictError, "did not rank"),
    ({"query": "Q", "decision": "no_match", "night_run_id": "other"}, DecisionConflictError, "did not rank"),
    ({"query": "Q", "decision": "no_match", "out": "/some/other/out"}, DecisionConflictError, "this is"),
    ({"query": "Q", "decision": "no_match", "reviewer": " "}, DecisionError, "reviewer is required"),
    ({"query": "Q", "decision": "no_match", "colour": "red"}, DecisionError, "unknown field"),
    ({"query": "Q", "decision": "no_match", "note": "a\x00b"}, DecisionError, "control characters"),
])
def test_bad_decisions_are_refused_and_nothing_is_written(out, fields, error, message):
    fields = {k: (query_uri(out, 0) if v == "Q" else v) for k, v in fields.items()}
    with pytest.raises(error, match=message):
        record_decisions(str(out), [DecisionRequest.from_mapping({"reviewer": "ana", **fields})])
    assert read_decisions(str(out)).empty


# ---------------------------------------------------------------------------- pairx decide
def test_decide_command_single_and_csv(out, tmp_path):
    q0, q1, q2 = (query_uri(out, i) for i in range(3))
    result = runner.invoke(app, ["decide", str(out), "--query", q0, "--individual", "ind-b", "--reviewer", "ana",
                                 "--note", "same notch"])
    assert result.exit_code == 0, result.output
    sheet = tmp_path / "decisions.csv"
    sheet.write_text("query,decision,reviewer,individual,rank,note\n"
                     f"{q1},match,bo,,0,\n{q2},new_individual,bo,Nemo,,first sighting\n")
    result = runner.invoke(app, ["decide", str(out), "--from-csv", str(sheet)])
    assert result.exit_code == 0, result.output
    assert "2 decision(s) recorded" in result.output
    frame = read_decisions(str(out))
    assert list(zip(frame["query"], frame["decision"], frame["individual"], frame["reviewer"])) == [
        (q0, "match", "ind-b", "ana"), (q1, "match", "ind-b", "bo"), (q2, "new_individual", "Nemo", "bo")]
    assert frame["note"].iloc[0] == "same notch" and frame["rank"].iloc[0] == 1  # ind-b is q0's candidate 2

    # a bad row: exit 2, one line naming the file and line, nothing written
    sheet.write_text(f"query,decision,reviewer\n{q0},no_match,ana\n{q1},no_match,\n")
    result = runner.invoke(app, ["decide", str(out), "--from-csv", str(sheet)])
    assert result.exit_code == 2 and f"{sheet}, line 3: reviewer is required" in result.output
    sheet.write_text(f"query,decision,reviewer\n{q0},no_match,ana\n/nowhere.png,no_match,ana\n")
    result = runner.invoke(app, ["decide", str(out), "--from-csv", str(sheet)])
    assert result.exit_code == 2 and "line 3: unknown upload" in result.output
    assert len(read_decisions(str(out))) == 3
    result = runner.invoke(app, ["decide", str(out), "--query", q0, "--no-match", "--unsure", "--reviewer", "a"])
    assert result.exit_code == 2 and "exactly one of" in result.output


# ---------------------------------------------------------------------------- the API
def _client(out: Path, **kwargs) -> TestClient:
    from infra.report.server import create_app

    return TestClient(create_app(str(out), **kwargs))


def test_api_validates_and_records(out):
    q = query_uri(out, 1)
    with _client(out) as client:
        ok = client.post("/api/decisions", json={"query": q, "decision": "match", "rank": 2, "reviewer": "ana"})
        assert ok.status_code == 200 and ok.json()["decision"]["individual"] == "ind-d"
        assert client.post("/api/decisions", json={"query": "/x.png", "decision": "no_match",
                                                   "reviewer": "ana"}).status_code == 404
        bad = client.post("/api/decisions", json={"query": q, "decision": "no_match"})
        assert bad.status_code == 400 and "reviewer is required" in bad.json()["error"]
        assert client.post("/api/decisions", content=b"{not json",
                           headers={"Content-Type": "application/json"}).status_code == 400
        assert client.post("/api/decisions", content=json.dumps({"query": q}),
                           headers={"Content-Type": "text/plain"}).status_code == 415
        conflict = client.post("/api/decisions", json={"query": q, "decision": "no_match", "reviewer": "ana",
                                                       "model_id": "retired-model"})
        assert conflict.status_code == 409 and "retired-model" in conflict.json()["error"]
        foreign = client.post("/api/decisions", json={"query": q, "decision": "unsure", "reviewer": "ana"},
                              headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        listed = client.get("/api/decisions", params={"night": NIGHT_RUN}).json()
        assert [r["decision"] for r in listed["decisions"]] == ["match"]
        assert [r["query"] for r in listed["latest"]] == [q]
        assert client.get("/api/decisions", params={"night": "other"}).json()["decisions"] == []
        assert client.get("/report/../tables/x").status_code == 404
        # a decision recorded by `pairx decide` while the server runs: the server sees it
        record_decisions(str(out), [_request(query=query_uri(out, 2), decision="no_match")])
        undo = client.post("/api/decisions", json={"query": query_uri(out, 2), "decision": "undo", "reviewer": "bo"})
        assert undo.status_code == 200, undo.json()
        assert undo.json()["decision"]["supersedes"] is not None
    assert list(read_decisions(str(out))["decision"]) == ["match", "no_match", "undo"]  # flushed at shutdown


def test_api_token(out):
    q = query_uri(out, 0)
    body = {"query": q, "decision": "unsure", "reviewer": "ana"}
    with _client(out, token="s3cret") as client:
        assert client.post("/api/decisions", json=body).status_code == 401
        assert client.post("/api/decisions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/api/decisions", json=body,
                           headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/api/decisions").status_code == 200  # reads need no token
    assert len(read_decisions(str(out))) == 1
    with _client(out) as client:  # a new server lists what the table holds
        listed = client.get("/api/decisions", params={"night": NIGHT_RUN}).json()
    (row,) = listed["decisions"]
    assert row["decision"] == "unsure" and row["box"] == [2.0, 3.0, 30.0, 20.0] and row["reviewer"] == "ana"
    assert row["decided_at"].endswith("+00:00") and row["similarity"] is None


def test_review_binds_loopback_by_default_and_needs_a_token_elsewhere(out, monkeypatch):
    from infra.report import server

    served = {}
    monkeypatch.setattr(server, "serve", lambda out, host, port, token, **kw: served.update(host=host, port=port))
    (out / "report").mkdir()
    result = runner.invoke(app, ["review", str(out)])
    assert result.exit_code == 0, result.output
    assert served == {"host": "127.0.0.1", "port": 8765}
    result = runner.invoke(app, ["review", str(out), "--host", "0.0.0.0"], env={"PAIRX_REVIEW_TOKEN": ""})
    assert result.exit_code == 2 and "--token" in result.output
    result = runner.invoke(app, ["review", str(out), "--host", "0.0.0.0"], env={"PAIRX_REVIEW_TOKEN": "t"})
    assert result.exit_code == 0 and served["host"] == "0.0.0.0"


def test_night_api_maps_page_sections_to_uploads(out):
    from infra.report import build_report

    build_report(str(out))
    with _client(out) as client:
        index = client.get("/report/index.html")
        assert index.status_code == 200 and b"/_review/review.js" in index.content
        slug = next((out / "report" / "nights").iterdir()).name
        page = client.get(f"/report/nights/{slug}/index.html")
        assert page.status_code == 200 and b"/_review/review.js" in page.content
        night = client.get("/api/night", params={"slug": slug}).json()
        assert [u["query"] for u in night["uploads"]] == [query_uri(out, i) for i in range(3)]
        assert {u["night_run_id"] for u in night["uploads"]} == {NIGHT_RUN}
        assert client.get("/api/night", params={"slug": "../x"}).status_code == 400
        assert client.get("/_review/review.js").status_code == 200
    assert "review.js" not in (out / "report" / "nights" / slug / "index.html").read_text()  # disk pages unchanged


# ---------------------------------------------------------------------------- views
def test_views_over_decisions(out):
    q0, q1, q2 = (query_uri(out, i) for i in range(3))
    record_decisions(str(out), [
        _request(query=q0, decision="match", rank=0),  # re-ranked first, retrieval second
        _request(query=q1, decision="match", rank=1),  # retrieval first
        _request(query=q2, decision="match", rank=0),
        _request(query=q2, decision="undo"),  # q2 pending again
    ])
    connection = create_views(duckdb.connect(), str(out))
    latest = connection.execute("SELECT query, decision FROM latest_decisions ORDER BY query").fetchall()
    assert latest == [(q0, "match"), (q1, "match")]
    progress = connection.execute(
        "SELECT uploads, decided, pending, median_s_to_decision FROM review_progress").fetchall()
    assert len(progress) == 1 and progress[0][:3] == (3, 2, 1) and progress[0][3] >= 0
    precision = connection.execute(
        "SELECT night_run_id, model_id, matches, retrieval_top1_share, reranked_top1_share "
        "FROM model_precision").fetchall()
    assert precision == [(NIGHT_RUN, MODEL, 2, 0.5, 0.5)]
    calibration = connection.execute("SELECT model_id, uploads, candidates, comparisons, auc_rerank_score, "
                                      "auc_similarity FROM plausibility_calibration").fetchall()
    # q0 accepted rank 0 (rerank best, similarity 2nd of 3): rerank 2/2, similarity 1/2
    # q1 accepted rank 1 (rerank 2nd, similarity best): rerank 1/2, similarity 2/2
    assert calibration == [(MODEL, 2, 6, 4, 0.75, 0.75)]


def test_views_exist_without_decisions(tmp_path):
    connection = create_views(duckdb.connect(), str(tmp_path))
    for view in ("latest_decisions", "review_progress", "model_precision", "plausibility_calibration"):
        assert connection.execute(f"SELECT count(*) FROM {view}").fetchone() == (0,)
