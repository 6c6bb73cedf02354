"""The review server as a real process: concurrent writes, SIGKILL, restart; the journal's recovery."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from decision_helpers import free_port, post, query_uri, start_server, write_output
from infra.decision_journal import DecisionJournal
from infra.decisions import DecisionRequest, UploadIndex, read_decisions, resolve_decision


def test_fifty_concurrent_decisions_survive_sigkill(tmp_path):
    out = write_output(tmp_path / "out", uploads=10)
    (out / "report").mkdir()
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(out, port, log, "--flush-seconds", "3600", "--flush-rows", "1000")
    try:
        kinds = ["unsure", "no_match", "match"]

        def one(i: int):
            body = {"query": query_uri(out, i % 10), "decision": kinds[i % 3], "reviewer": f"r{i % 2}"}
            if body["decision"] == "match":
                body["rank"] = i % 3
            return post(port, body)

        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(one, range(50)))
        assert [status for status, _ in answers] == [200] * 50, answers
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    acknowledged = {body["decision"]["decision_id"] for _, body in answers}
    assert read_decisions(str(out)).empty  # nothing flushed yet: all 50 only in the journal
    assert list((out / "_pairx" / "review-journal").glob("segment-*"))

    server = start_server(out, port, log)  # recovers the journal before it answers
    try:
        frame = read_decisions(str(out))
        assert set(frame["decision_id"]) == acknowledged and len(frame) == 50
        # each upload's five decisions form one chain: every row supersedes the one before
        for _, rows in frame.groupby("query"):
            assert list(rows["supersedes"].iloc[1:]) == list(rows["decision_id"].iloc[:-1])
        assert not list((out / "_pairx" / "review-journal").glob("segment-*"))
        status, body = post(port, {"query": query_uri(out, 0), "decision": "undo", "reviewer": "r0"})
        assert status == 200
    finally:
        server.send_signal(signal.SIGTERM)  # a clean stop flushes what is pending
        server.wait(timeout=60)
    assert len(read_decisions(str(out))) == 51


def _rows(out: Path, n: int) -> list[dict]:
    index = UploadIndex.load(str(out))
    return [resolve_decision(DecisionRequest.from_mapping({"query": query_uri(out, i % 3), "decision": "unsure",
                                                           "reviewer": "ana"}), index, {}, out=str(out), run_id="t")
            for i in range(n)]


def test_journal_batches_and_recovers_without_duplicates(tmp_path, monkeypatch):
    out = write_output(tmp_path / "out")
    folder = tmp_path / "journal"
    journal = DecisionJournal(folder, str(out), "review-1", flush_rows=50)
    journal.open()
    rows = _rows(out, 120)
    for row in rows[:100]:
        journal.append(row)
    assert journal.due(3600) and journal.flush() == 100
    assert len(list((out / "tables" / "decisions").rglob("*.parquet"))) == 1  # one file per flush and model

    # killed after the Parquet write but before its segment was deleted, with a torn last line
    for row in rows[100:110]:
        journal.append(row)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    journal.flush()
    monkeypatch.undo()
    for row in rows[110:]:
        journal.append(row)
    segment = sorted(folder.glob("segment-*.jsonl"))[-1]
    with segment.open("a") as handle:
        handle.write(json.dumps(rows[0], default=str)[:40])  # a write the kill cut short: never acknowledged
    os.close(journal._lock_fd)  # the process dies: its lock goes with it

    again = DecisionJournal(folder, str(out), "review-2")
    assert again.open() == 10  # the 10 never flushed; the 10 already in the table are not written twice
    frame = read_decisions(str(out))
    assert sorted(frame["decision_id"]) == sorted(r["decision_id"] for r in rows)
    assert not list(folder.glob("segment-*"))
    again.close()


def test_one_server_per_journal(tmp_path):
    from pairx_core.errors import ConfigError

    out = write_output(tmp_path / "out")
    first = DecisionJournal(tmp_path / "journal", str(out), "a")
    first.open()
    with pytest.raises(ConfigError, match="another review server"):
        DecisionJournal(tmp_path / "journal", str(out), "b").open()
    first.close()


CHECK_SCRIPT = """
<script>
document.addEventListener('pairx-review-ready', function () {
  var press = (location.hash.match(/press=(\\w+)/) || [])[1];
  var section = document.querySelector('section.upload');
  var before = section.querySelector('.pairx-status').textContent;
  document.getElementById('pairx-reviewer').value = 'robot';
  if (press !== 'none') document.body.dispatchEvent(new KeyboardEvent('keydown', {key: press, bubbles: true}));
  var tries = 0;
  (function wait() {
    var status = section.querySelector('.pairx-status').textContent;
    if (press !== 'none' && status === before && tries++ < 100) { setTimeout(wait, 50); return; }
    var pre = document.createElement('pre');
    pre.id = 'pairx-check';
    pre.textContent = JSON.stringify({decision: section.getAttribute('data-decision'), status: status,
                                      message: document.getElementById('pairx-message').textContent});
    document.body.appendChild(pre);
  })();
});
</script>
"""


def test_decide_in_chromium_press_2_reload_undo(tmp_path):
    import re

    from infra.report import build_report
    from test_report_flow import _chromium, _run_chromium

    binary = _chromium()
    out = write_output(tmp_path / "out", uploads=2)
    build_report(str(out))
    (night_dir,) = (out / "report" / "nights").iterdir()
    page = night_dir / "index.html"
    (night_dir / "browser-check.html").write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    port, log = free_port(), tmp_path / "server.log"
    server = start_server(out, port, log, "--flush-seconds", "3600")

    def visit(press: str, profile: str) -> dict:
        url = f"http://127.0.0.1:{port}/report/nights/{night_dir.name}/browser-check.html#press={press}"
        dumped = _run_chromium(binary, tmp_path / profile, "--virtual-time-budget=15000", "--dump-dom", url)
        found = re.search(r'<pre id="pairx-check">(.*?)</pre>', dumped.stdout, re.S)
        assert found, f"no check result; chromium said:\n{dumped.stderr[-2000:]}\nserver:\n{log.read_text()[-2000:]}"
        return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))

    try:
        pressed = visit("2", "p1")
        assert pressed["decision"] == "match" and "candidate 2" in pressed["status"], pressed
        assert "robot" in pressed["status"]
        reloaded = visit("none", "p2")
        assert reloaded["decision"] == "match" and reloaded["status"] == pressed["status"]
        undone = visit("u", "p3")
        assert undone["decision"] is None and "pending" in undone["status"], undone
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    frame = read_decisions(str(out))
    assert list(frame["decision"]) == ["match", "undo"] and list(frame["reviewer"]) == ["robot", "robot"]
    assert frame["query"].tolist() == [query_uri(out, 0)] * 2 and frame["rank"].iloc[0] == 1
    assert frame["supersedes"].iloc[1] == frame["decision_id"].iloc[0]
