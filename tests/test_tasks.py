"""Task helpers without Prefect or Dask: concurrent image loading and its error handling."""

from __future__ import annotations

import math

import threading

import pytest

from infra.images import ImageError
from tasks import explain as explain_task
from pairx_core import ConfigError
from tasks.explain import RunSettings, _load_images, parse_angle, parse_box

SETTINGS = RunSettings(out="memory://unused", model="unused", layers=("l",), run_id="run-1")


def _fake_loader(monkeypatch, behaviour):
    threads = set()
    running = {"now": 0, "most": 0}
    lock = threading.Condition()

    class FakePhoto:
        def __init__(self, uri):
            self.uri = uri

        def chip(self, box=None, theta=0.0, min_side=1):
            return (self.uri, box, theta)

    def load_photo(uri, chips, need, storage_options=None, **kwargs):
        threads.add(threading.get_ident())
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            lock.notify_all()
            # hold this read until another is in flight (a loader reading one at a time waits out the 2 s)
            lock.wait_for(lambda: running["most"] > 1, timeout=2)
        with lock:
            running["now"] -= 1
        threads.add(("most", running["most"]))
        outcome = behaviour[uri]
        if isinstance(outcome, BaseException):
            raise outcome
        return FakePhoto(uri)

    monkeypatch.setattr(explain_task, "load_photo", load_photo)
    return threads


def test_loads_concurrently_and_records_bad_input(monkeypatch):
    behaviour = {f"img{i}": "ok" for i in range(8)}
    behaviour["broken"] = ImageError("broken", "not an image")
    behaviour["odd"] = ValueError("unexpected decoder failure")
    threads = _fake_loader(monkeypatch, behaviour)
    keys = [(uri, None, 0.0) for uri in behaviour]
    images, failed, errors = _load_images(keys, SETTINGS)
    most = max(t[1] for t in threads if isinstance(t, tuple))
    assert most > 1  # reads overlapped (several loads in flight at once)
    assert set(images) == {k for k in keys if k[0].startswith("img")}
    assert images[("img3", None, 0.0)] == ("img3", None, 0.0)
    assert failed == {("broken", None, 0.0), ("odd", None, 0.0)}
    assert {(e["item"], e["stage"], e["error_type"]) for e in errors} == {
        ("broken", "load", "ImageError"), ("odd", "load", "ValueError")}


def test_transient_errors_raise_for_a_retry(monkeypatch):
    _fake_loader(monkeypatch, {"ok": "ok", "flaky": ConnectionResetError("reset by peer")})
    with pytest.raises(ConnectionResetError):
        _load_images([("ok", None, 0.0), ("flaky", None, 0.0)], SETTINGS)


def test_nothing_to_load():
    assert _load_images([], SETTINGS) == ({}, set(), [])


def test_box_and_angle_cells_from_csv_and_parquet():
    assert parse_box("8 16 40 32") == parse_box("[8, 16, 40, 32]") == parse_box([8, 16, 40, 32]) == (8, 16, 40, 32)
    assert parse_box(None) is parse_box(float("nan")) is parse_box("  ") is None
    with pytest.raises(ConfigError, match="4 numbers"):
        parse_box("1 2 3")
    assert parse_angle("0.3") == parse_angle(0.3) == 0.3
    assert parse_angle(None) == parse_angle("") == 0.0  # empty cell: no rotation
    assert math.isnan(parse_angle(float("nan")))  # a written NaN is kept: the pair gets an errors row
