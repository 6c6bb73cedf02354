"""Leases that cannot wedge: unreadable or expired leases are taken over with a word; waits are announced
once; upkeep commands refuse while a run writes and remove a dead run's orphans whatever their age."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from typer.testing import CliRunner

from infra.lease import LEASE_PATH, OutputLockedError, output_lease
from infra.storage import StorageTarget


@pytest.mark.parametrize("content", [b"", b'{"run_id": "half', b"\x00" * 64, b"[]"])
def test_an_unreadable_lease_is_taken_over_with_a_warning(tmp_path, caplog, content):
    out = str(tmp_path / "out")
    lease_file = tmp_path / "out" / LEASE_PATH
    lease_file.parent.mkdir(parents=True)
    lease_file.write_bytes(content)  # e.g. a disk that filled up while the lease was written
    with caplog.at_level(logging.WARNING, logger="pairx.lease"):
        lease = output_lease(out, "run-new", "nightly", wait_s=0)
    assert lease.record["run_id"] == "run-new"
    assert json.loads(lease_file.read_bytes())["run_id"] == "run-new"
    assert "unreadable lease" in caplog.text
    lease.release()
    assert not lease_file.exists()
    assert [p.name for p in lease_file.parent.iterdir()] == []  # no temporary file left behind


def test_an_expired_lease_is_taken_over_naming_its_holder(tmp_path, caplog):
    out = str(tmp_path / "out")
    expired = {"run_id": "night-7", "flow": "nightly", "host": "elsewhere", "pid": 1, "token": "u",
               "expires_at": time.time() - 5}
    StorageTarget.from_url(out).write_bytes_atomic(LEASE_PATH, json.dumps(expired).encode())
    with caplog.at_level(logging.WARNING, logger="pairx.lease"):
        output_lease(out, "run-new", "nightly", wait_s=0).release()
    assert "taking over the lease of run night-7" in caplog.text and "expired" in caplog.text


def test_a_waiting_run_says_so_once_with_holder_and_time_left(tmp_path, caplog):
    out = str(tmp_path / "out")
    first = output_lease(out, "run-1", "nightly")
    try:
        with caplog.at_level(logging.WARNING, logger="pairx.lease"), pytest.raises(OutputLockedError):
            output_lease(out, "run-2", "nightly", wait_s=0.4, poll_s=0.05)
    finally:
        first.release()
    waits = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waits) == 1 and "run run-1" in waits[0] and "s more" in waits[0]


@pytest.mark.parametrize("command", [["gc"], ["cache", "prune", "--older-than", "1"], ["report"],
                                     ["verify", "--repair"], ["compact"]])
def test_upkeep_commands_refuse_while_a_run_writes(tmp_path, command):
    from flows.cli import app
    from infra.tables import write_table

    out = str(tmp_path / "out")
    write_table(out, "errors", [{"item": "x", "stage": "load", "error_type": "E", "message": "m",
                                 "content_hash": None}], "m1", "run0")
    args = command[:-2] + [out] + command[-2:] if command[0] == "cache" else command[:1] + [out] + command[1:]
    with output_lease(out, "night-1", "nightly"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "night-1" in result.output, result.output


def test_gc_removes_a_dead_runs_orphans_whatever_their_age(tmp_path):
    """A crashed run's fresh orphan picture: gc (holding the lease) removes it without --min-age-hours 0."""
    from flows.cli import app
    from infra.tables import write_table

    out = tmp_path / "out"
    write_table(str(out), "errors", [{"item": "x", "stage": "load", "error_type": "E", "message": "m",
                                      "content_hash": None}], "m1", "run0")
    orphan = out / "viz" / "model=m1" / "p1" / f"blocks.3-{'a' * 16}.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"png")
    dead = {"run_id": "crashed", "flow": "nightly", "host": "elsewhere", "pid": 1, "token": "u",
            "expires_at": time.time() - 1}
    StorageTarget.from_url(str(out)).write_bytes_atomic(LEASE_PATH, json.dumps(dead).encode())
    runner = CliRunner()
    kept = runner.invoke(app, ["gc", str(out), "--no-lease"])  # state unknown: the age rule holds
    assert kept.exit_code == 0 and "0 picture(s)" in kept.output and orphan.exists()
    result = runner.invoke(app, ["gc", str(out)])
    assert result.exit_code == 0 and "removed 0 uncommitted matches file(s), 1 picture(s)" in result.output
    assert not orphan.exists() and not os.path.exists(out / LEASE_PATH)


@pytest.mark.parametrize("args", [["gc", "--min-age-hours", "0"], ["gc", "--min-age-hours", "-1"],
                                  ["cache", "prune", "--older-than", "-5"], ["cache", "prune", "--older-than", "0"],
                                  ["gc", "--lease-wait", "-1"]])
def test_non_positive_ages_are_refused(tmp_path, args):
    import numpy as np

    from flows.cli import app
    from infra.cache import ActivationCache

    out = tmp_path / "out"
    ActivationCache(str(out / "cache"), "model-a", "prep1").put(["h1"], np.ones((1, 4), np.float32))
    (out / "tables").mkdir()
    full = args[:1] + [str(out)] + args[1:] if args[0] == "gc" else args[:2] + [str(out)] + args[2:]
    result = CliRunner().invoke(app, full)
    assert result.exit_code == 2 and "must be" in result.output
    assert list((out / "cache").rglob("*.json"))  # nothing deleted


def test_cache_prune_shows_what_it_deletes_and_wants_yes_for_everything(tmp_path):
    import numpy as np

    from flows.cli import app
    from infra.cache import ActivationCache

    out = tmp_path / "out"
    ActivationCache(str(out / "cache"), "model-a", "prep1").put(["h1"], np.ones((1, 4), np.float32))
    ActivationCache(str(out / "cache"), "model-b", "prep1").put(["h2"], np.ones((1, 4), np.float32))
    runner = CliRunner()
    one = runner.invoke(app, ["cache", "prune", str(out), "--model", "model-a"])
    assert one.exit_code == 0 and "deleting 1 of 2 batch(es) of model model-a" in one.output
    everything = runner.invoke(app, ["cache", "prune", str(out), "--older-than", "0.0000001"])
    assert everything.exit_code == 2 and "--yes" in everything.output
    assert "would delete 1 of 1 batch(es)" in everything.output
    assert "model-b: 1 image(s)" in runner.invoke(app, ["cache", "info", str(out)]).output
    done = runner.invoke(app, ["cache", "prune", str(out), "--older-than", "0.0000001", "--yes"])
    assert done.exit_code == 0 and "removed 1 batch(es)" in done.output


@pytest.mark.parametrize("args", [["report"], ["compact"], ["gc"], ["verify"], ["cache", "info"],
                                  ["cache", "prune", "--older-than", "1"]])
def test_upkeep_commands_refuse_a_folder_that_is_no_output(tmp_path, args):
    from flows.cli import app

    typo = tmp_path / "typo"
    full = args[:2] + [str(typo)] + args[2:] if args[0] == "cache" else args + [str(typo)]
    result = CliRunner().invoke(app, full)
    assert result.exit_code == 2 and "not a pairx output root: no tables/ or _pairx/" in result.output
    assert not typo.exists()
    plain = tmp_path / "photos"
    plain.mkdir()
    full = args[:2] + [str(plain)] + args[2:] if args[0] == "cache" else args + [str(plain)]
    assert CliRunner().invoke(app, full).exit_code == 2
    assert list(plain.iterdir()) == []
