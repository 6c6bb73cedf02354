"""The review site's index shows the review figures, read through the dashboard views; ground truth
decides like a reviewer (``pairx demo --auto-decide``)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from decision_helpers import MODEL, NIGHT_RUN, query_uri, write_output
from infra.decisions import DecisionRequest, record_decisions
from infra.report import build_report, write_index
from infra.views import create_views
from report_helpers import parse_page, resolve


class TableCells(HTMLParser):
    """Text of every cell of the tables with an ``id``, row by row: ``{table id: [[cell, ...], ...]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def index_tables(out: Path) -> dict[str, list[list[str]]]:
    parser = TableCells()
    parser.feed((out / "report" / "index.html").read_text())
    return {name: [row for row in rows if row] for name, rows in parser.tables.items()}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return write_output(tmp_path / "out")


def _decide(out: Path, **fields) -> None:
    record_decisions(str(out), [DecisionRequest.from_mapping({"reviewer": "ana", **fields})])


def test_index_shows_review_progress_precision_and_calibration(out):
    build_report(str(out))
    before = index_tables(out)
    assert before["nights"][0][-3:] == ["0", "3", "n/a"]  # nothing decided yet: all 3 pending
    assert "model-precision" not in before and "No upload accepted" in (out / "report" / "index.html").read_text()

    q0, q1, q2 = (query_uri(out, i) for i in range(3))
    _decide(out, query=q0, decision="match", rank=0)  # re-ranked first, retrieval second
    _decide(out, query=q1, decision="match", rank=1)  # retrieval first
    _decide(out, query=q2, decision="unsure")
    write_index(str(out))  # the index alone, after decisions recorded outside a report build
    tables = index_tables(out)
    decided, pending, median = tables["nights"][0][-3:]
    assert (decided, pending) == ("2", "1") and median.endswith(" s")
    assert tables["model-precision"] == [[tables["nights"][0][0], MODEL, NIGHT_RUN, "2", "2", "50%", "50%"]]
    assert tables["plausibility-calibration"] == [[MODEL, "2", "6", "4", "0.750", "0.750"]]

    # the same numbers as the views give any dashboard (one query path)
    views = create_views(duckdb.connect(), str(out))
    assert views.execute("SELECT decided, pending FROM review_progress").fetchall() == [(2, 1)]
    assert views.execute("SELECT auc_rerank_score FROM plausibility_calibration").fetchall() \
        == [(0.75,)]

    # a full build writes the same index, and it still opens from disk (relative links only)
    build_report(str(out))
    assert index_tables(out) == tables
    index = out / "report" / "index.html"
    page = parse_page(index)
    assert not page.external
    assert all(resolve(index, link).is_file() for link in page.links if resolve(index, link) is not None)


def test_index_without_readable_views_still_lists_the_nights(out, monkeypatch):
    import infra.report.figures as figures

    def broken(connection, out, storage_options=None):
        raise duckdb.IOException("no httpfs for s3://bucket")

    monkeypatch.setattr(figures, "create_views", broken)
    build_report(str(out))
    text = (out / "report" / "index.html").read_text()
    assert "Figures unavailable: no httpfs" in text
    assert index_tables(out)["nights"][0][-3:] == ["-", "-", "-"]


def test_decide_and_the_review_server_refresh_the_index(out):
    import time

    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    from flows.cli import app
    from infra.report.server import create_app

    build_report(str(out))
    result = CliRunner().invoke(app, ["decide", str(out), "--query", query_uri(out, 0), "--individual", "ind-a",
                                      "--reviewer", "ana"])
    assert result.exit_code == 0, result.output
    assert index_tables(out)["nights"][0][-3:-1] == ["1", "2"]

    with TestClient(create_app(str(out), flush_every_s=0.0, flush_rows=1)) as client:
        answer = client.post("/api/decisions", json={"query": query_uri(out, 1), "decision": "no_match",
                                                     "reviewer": "bo"})
        assert answer.status_code == 200
        deadline = time.monotonic() + 30  # the flusher thread writes the table, then the index
        while index_tables(out)["nights"][0][-3:-1] != ["2", "1"] and time.monotonic() < deadline:
            time.sleep(0.1)
    assert index_tables(out)["nights"][0][-3:-1] == ["2", "1"]


def test_ground_truth_decides_like_a_reviewer_and_every_view_has_rows(out):
    from flows.demo import DEMO_REVIEWER, decide_from_truth
    from infra.decisions import read_decisions

    build_report(str(out))
    q0, q1, q2 = (query_uri(out, i) for i in range(3))
    truth = {q0: {"individual": "ind-a"},  # its rank-0 candidate
             q1: {"individual": "ind-a"},  # known, but not among upload 1's candidates (ind-b, ind-c, ind-d)
             q2: {"individual": "ind-new"}}  # in no gallery
    assert decide_from_truth(str(out), truth) == {"match": 2, "new_individual": 1}
    rows = read_decisions(str(out)).set_index("query")
    assert rows.loc[q0, ["decision", "rank", "individual"]].tolist() == ["match", 0, "ind-a"]
    assert rows.loc[q1, "decision"] == "match" and pd.isna(rows.loc[q1, "rank"])  # outside the candidates
    assert rows.loc[q2, ["decision", "individual"]].tolist() == ["new_individual", "ind-new"]
    assert set(rows["reviewer"]) == {DEMO_REVIEWER}
    assert decide_from_truth(str(out), truth) == {}  # decided uploads are left alone on a second run

    views = create_views(duckdb.connect(), str(out))
    for view in ("latest_decisions", "review_progress", "model_precision", "plausibility_calibration"):
        assert views.execute(f"SELECT count(*) FROM {view}").fetchone()[0] > 0, view
    assert index_tables(out)["nights"][0][-3:-1] == ["3", "0"]  # the index was rewritten


def test_ground_truth_without_an_individual_is_no_match(out):
    from flows.demo import truth_requests

    requests = truth_requests(str(out), {query_uri(out, 0): {"individual": None}})
    assert [(r.query, r.decision) for r in requests] == [(query_uri(out, 0), "no_match")]
