"""Decisions per detection: the two animals of one camera-trap frame are two uploads, decided apart
(table, API, `pairx decide`, views, the growing gallery, the demo's ground truth)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from decision_helpers import (FRAME_DETECTIONS, FRAME_HASH, MODEL, NIGHT_RUN, frame_uri, query_uri, write_frame,
                              write_output)
from flows.cli import app
from infra.decisions import (DecisionError, DecisionRequest, UnknownUploadError, latest_by_upload, read_decisions,
                             record_decisions)
from infra.views import create_views

(FIRST, FIRST_ID, FIRST_BOX), (SECOND, SECOND_ID, SECOND_BOX) = FRAME_DETECTIONS


@pytest.fixture
def out(tmp_path: Path) -> Path:
    out = write_output(tmp_path / "out")
    write_frame(out)
    return out


def _request(**fields) -> DecisionRequest:
    return DecisionRequest.from_mapping({"reviewer": "ana", **fields})


def test_two_detections_of_one_frame_keep_two_decisions(out):
    frame = frame_uri(out)
    first, second = record_decisions(str(out), [
        _request(query=frame, detection_id=FIRST_ID, decision="match", rank=0),
        _request(query=frame, box=SECOND_BOX, decision="new_individual", individual="Nemo")])
    assert (first["detection_id"], first["individual"], first["box"]) == (FIRST_ID, "ind-a", FIRST_BOX)
    assert (second["detection_id"], second["individual"], second["box"]) == (SECOND_ID, "Nemo", SECOND_BOX)
    assert first["content_hash"] == second["content_hash"] == FRAME_HASH
    assert first["supersedes"] is None and second["supersedes"] is None  # neither replaces the other
    whole, = record_decisions(str(out), [_request(query=query_uri(out, 1), decision="no_match")])
    assert whole["detection_id"] is None  # a whole-photo upload needs no detection id
    latest = latest_by_upload(read_decisions(str(out)))
    assert {key[2]: row["decision"] for key, row in latest.items() if key[0] == frame} == {
        FIRST_ID: "match", SECOND_ID: "new_individual"}
    connection = create_views(duckdb.connect(), str(out))
    rows = connection.execute("SELECT detection_id, individual FROM latest_decisions WHERE query = ? "
                              "ORDER BY detection_id", [frame]).fetchall()
    assert rows == [(FIRST_ID, "ind-a"), (SECOND_ID, "Nemo")]
    progress = connection.execute("SELECT uploads, decided FROM review_progress").fetchall()
    assert progress == [(3 + 2, 3)]  # 3 photos and 2 detections ranked; both detections and one photo decided
    # undoing one detection's decision leaves the other standing
    undo, = record_decisions(str(out), [_request(query=frame, detection_id=SECOND_ID, decision="undo")])
    assert undo["supersedes"] == second["decision_id"]
    rows = create_views(duckdb.connect(), str(out)).execute(
        "SELECT detection_id FROM latest_decisions WHERE query = ?", [frame]).fetchall()
    assert rows == [(FIRST_ID,)]


def test_an_unknown_or_unnamed_detection_is_refused(out):
    frame = frame_uri(out)
    with pytest.raises(UnknownUploadError, match="unknown detection 'nope'"):
        record_decisions(str(out), [_request(query=frame, detection_id="nope", decision="unsure")])
    with pytest.raises(UnknownUploadError, match="no ranked detection at box"):
        record_decisions(str(out), [_request(query=frame, box=[0, 0, 5, 5], decision="unsure")])
    with pytest.raises(DecisionError, match="ranked per detection"):
        record_decisions(str(out), [_request(query=frame, decision="unsure")])
    with pytest.raises(DecisionError, match="box must be 4 finite numbers"):
        _request(query=frame, box=[1, 2, 3], decision="unsure")
    assert read_decisions(str(out)).empty


def test_api_decides_each_detection_and_404s_an_unknown_one(out):
    from infra.report.server import create_app

    from infra.report.data import load_nights

    frame = frame_uri(out)
    slug = load_nights(str(out))[0].slug
    with TestClient(create_app(str(out))) as client:
        listed = client.get("/api/night", params={"slug": slug}).json()["uploads"]
        assert sorted(u["detection_id"] for u in listed if u["query"] == frame) == [FIRST_ID, SECOND_ID]
        assert all(u["night_run_id"] == NIGHT_RUN for u in listed)
        for detection_id, rank in ((FIRST_ID, 0), (SECOND_ID, 1)):
            answer = client.post("/api/decisions", json={"query": frame, "detection_id": detection_id,
                                                         "decision": "match", "rank": rank, "reviewer": "ana"})
            assert answer.status_code == 200, answer.json()
            assert answer.json()["decision"]["detection_id"] == detection_id
        unknown = client.post("/api/decisions", json={"query": frame, "detection_id": "nope", "decision": "unsure",
                                                      "reviewer": "ana"})
        assert unknown.status_code == 404 and "unknown detection" in unknown.json()["error"]
        latest = client.get("/api/decisions", params={"night": NIGHT_RUN}).json()["latest"]
        assert sorted((r["detection_id"], r["individual"]) for r in latest) == [(FIRST_ID, "ind-a"),
                                                                                (SECOND_ID, "ind-a")]


def test_decide_command_takes_a_detection(out):
    frame = frame_uri(out)
    runner = CliRunner()
    ok = runner.invoke(app, ["decide", str(out), "--query", frame, "--detection", SECOND_ID, "--individual", "ind-b",
                             "--reviewer", "ana"])
    assert ok.exit_code == 0, ok.output
    assert f"(detection {SECOND_ID})" in ok.output
    unknown = runner.invoke(app, ["decide", str(out), "--query", frame, "--detection", "nope", "--unsure",
                                  "--reviewer", "ana"])
    assert unknown.exit_code == 2 and "unknown detection" in unknown.output
    csv = out / "decisions.csv"
    csv.write_text(f"query,detection_id,decision,reviewer\n{frame},{FIRST_ID},no_match,bo\n")
    from_file = runner.invoke(app, ["decide", str(out), "--from-csv", str(csv)])
    assert from_file.exit_code == 0, from_file.output
    assert sorted(read_decisions(str(out))["detection_id"]) == [FIRST_ID, SECOND_ID]


def test_confirmed_detections_join_the_gallery_as_their_own_crops(out):
    from infra.night_items import gallery_source

    frame = frame_uri(out)
    record_decisions(str(out), [_request(query=frame, detection_id=FIRST_ID, decision="match", rank=0),
                                _request(query=frame, detection_id=SECOND_ID, decision="new_individual",
                                         individual="Nemo")])
    gallery = out / "gallery" / "ind-z"
    gallery.mkdir(parents=True)
    (gallery / "a.png").write_bytes((out / "photos" / "ind-a.png").read_bytes())
    confirmed = [item for item in gallery_source(str(out / "gallery"), str(out)) if item.source == "confirmed"]
    assert sorted((item.uri, item.box, item.individual) for item in confirmed) == [
        (frame, tuple(FIRST_BOX), "ind-a"), (frame, tuple(SECOND_BOX), "Nemo")]
    assert len({item.name for item in confirmed}) == 2  # two gallery items, not one photo


def test_ground_truth_decides_every_detection(out):
    from flows.demo import truth_requests

    frame = frame_uri(out)
    truth = {f"{frame}#detection={FIRST}": {"individual": "ind-a"},
             f"{frame}#detection={SECOND}": {"individual": "ind-b"}, query_uri(out, 0): {"individual": None}}
    requests = truth_requests(str(out), truth)
    assert sorted((r.query, r.detection_id, r.decision) for r in requests) == [
        (frame, FIRST_ID, "match"), (frame, SECOND_ID, "match"), (query_uri(out, 0), None, "no_match")]
    rows = record_decisions(str(out), requests)
    assert sorted((r["detection_id"] or "", r["individual"] or "") for r in rows) == [
        ("", ""), (FIRST_ID, "ind-a"), (SECOND_ID, "ind-b")]
    assert truth_requests(str(out), truth) == []  # every detection decided: nothing left
    assert MODEL in set(read_decisions(str(out))["model_id"])


def test_a_detection_block_names_its_detection_for_the_review_script(out):
    from infra.report.data import load_nights
    from infra.report.pages import _upload_attributes

    night, = load_nights(str(out))
    blocks = {(u.photo.uri, u.detection_id): _upload_attributes(night, u, n)
              for n, u in enumerate(night.uploads, start=1)}
    frame = frame_uri(out)
    assert f"data-detection='{FIRST_ID}'" in blocks[(frame, FIRST_ID)]
    assert f"data-detection='{SECOND_ID}'" in blocks[(frame, SECOND_ID)]
    assert "data-detection" not in blocks[(query_uri(out, 0), None)]  # a whole photo has none
