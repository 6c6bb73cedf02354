"""Pictures drawn in a background thread while the next engine batch computes.

The order of events is recorded by spies (engine batches, picture drawing), not by clocks.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import pairx_core.engine as engine_module
import tasks.explain as explain_module
from infra.inputs import PairItem
from infra.tables import read_table
from pairx_core import explain_indexed
from tests.model_helpers import plain_stack, random_images

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def _photos(folder, names):
    rng = np.random.default_rng(3)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return {name: str(folder / f"{name}.png") for name in names}


def _settings(tmp_path, **kwargs):
    return explain_module.RunSettings(out=str(tmp_path / "out"), model=MODEL, layers=(LAYER,), run_id="r",
                                      k_lines=3, k_colors=0, device="cpu", **kwargs)


def test_the_engine_hands_over_each_batch_as_it_finishes():
    model, images = plain_stack(), random_images(4, size=16)
    pairs = [(0, 1), (2, 3), (1, 2)]
    delivered = []
    results = explain_indexed(model, images, pairs, "features.3", k_colors=0, batch_size=1,
                              on_batch=lambda batch: delivered.append([r.index for r in batch]))
    assert delivered == [[0], [1], [2]]
    assert [r.index for r in results] == [0, 1, 2]


def test_a_picture_that_fails_gives_its_pair_an_error_row_and_the_others_their_pictures(tmp_path, monkeypatch):
    photos = _photos(tmp_path, ["a", "b", "bad", "c"])
    items = [PairItem("p0", photos["a"], photos["b"]), PairItem("p1", photos["bad"], photos["b"]),
             PairItem("p2", photos["c"], photos["a"]), PairItem("p3", photos["b"], photos["c"])]
    real_render = explain_module.render

    def render(*args, label_0, **kwargs):
        if "bad.png" in label_0:
            raise ValueError("cannot draw this one")
        return real_render(*args, label_0=label_0, **kwargs)

    monkeypatch.setattr(explain_module, "render", render)
    summary = explain_module.explain_pairs_batch(items, _settings(tmp_path))
    assert (summary.done, summary.failed) == (3, 1)
    out = str(tmp_path / "out")
    pairs = read_table(out, "pairs")
    assert sorted(pairs["pair_id"]) == ["p0", "p2", "p3"]
    for uri in pairs["viz_uri"]:
        assert uri and Image.open(uri).size[0] > 0
    errors = read_table(out, "errors")
    assert errors[["item", "stage", "error_type"]].values.tolist() == [["p1", "render", "ValueError"]]
    pictures = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert len(pictures) == 3  # nothing drawn for the failed pair
    # a rerun computes the failed pair again and skips the rest
    monkeypatch.setattr(explain_module, "render", real_render)
    again = explain_module.explain_pairs_batch(items, _settings(tmp_path))
    assert (again.done, again.skipped, again.failed) == (1, 3, 0)


def test_the_pictures_of_a_batch_are_drawn_while_the_next_batch_computes(tmp_path, monkeypatch):
    photos = _photos(tmp_path, ["a", "b", "c", "d"])
    items = [PairItem("p0", photos["a"], photos["b"]), PairItem("p1", photos["c"], photos["d"]),
             PairItem("p2", photos["b"], photos["c"]), PairItem("p3", photos["d"], photos["a"])]
    events: list[str] = []
    lock = threading.Lock()
    second_batch_started = threading.Event()
    real_batch, real_render = engine_module._explain_batch, explain_module.render
    batches = {"n": 0}

    def record(event):
        with lock:
            events.append(event)

    def explain_batch(*args, **kwargs):
        number = batches["n"]
        batches["n"] += 1
        record(f"compute {number} start")
        if number == 1:
            second_batch_started.set()
        result = real_batch(*args, **kwargs)
        record(f"compute {number} end")
        return result

    def render(*args, **kwargs):
        record("draw start")
        # the first picture waits for the second batch to start; drawing after the engine (or
        # between its batches on the engine's thread) would never see it
        second_batch_started.wait(timeout=20)
        record("draw end")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_explain_batch", explain_batch)
    monkeypatch.setattr(explain_module, "render", render)
    # a memory budget of 2 images per batch: the task's 4 pairs go to the engine one by one
    summary = explain_module.explain_pairs_batch(items, _settings(tmp_path, memory_budget=1))
    assert summary.done == 4 and batches["n"] == 4
    assert events.index("compute 0 end") < events.index("draw start")
    assert events.index("compute 1 start") < events.index("draw end")  # overlap
    assert events.count("draw end") == 4  # every picture drawn before the task returned
    assert len(read_table(str(tmp_path / "out"), "pairs")) == 4


def test_inline_rendering_draws_after_the_engine(tmp_path, monkeypatch):
    photos = _photos(tmp_path, ["a", "b", "c"])
    items = [PairItem("p0", photos["a"], photos["b"]), PairItem("p1", photos["b"], photos["c"])]
    events: list[str] = []
    real_batch, real_render = engine_module._explain_batch, explain_module.render
    monkeypatch.setattr(engine_module, "_explain_batch",
                        lambda *a, **k: events.append("compute") or real_batch(*a, **k))
    monkeypatch.setattr(explain_module, "render", lambda *a, **k: events.append("draw") or real_render(*a, **k))
    summary = explain_module.explain_pairs_batch(items, _settings(tmp_path, render_in_background=False))
    assert summary.done == 2 and events == ["compute", "draw", "draw"]  # one engine batch, then pictures


def test_at_most_one_batch_of_pictures_in_flight():
    queue = explain_module._RenderQueue(background=True)
    events: list[str] = []
    release = threading.Event()

    def first():
        release.wait(timeout=0.5)
        events.append("first done")

    queue.submit(first)
    events.append("first submitted")
    queue.submit(lambda: events.append("second done"))
    events.append("second submitted")  # only after the first batch of pictures finished
    queue.close()
    assert events == ["first submitted", "first done", "second submitted", "second done"]


def test_an_unexpected_render_failure_reaches_the_task():
    queue = explain_module._RenderQueue(background=True)

    def broken():
        raise RuntimeError("bug in drawing")

    queue.submit(broken)
    with pytest.raises(RuntimeError, match="bug in drawing"):
        queue.close()


def test_an_engine_failure_in_a_later_batch_keeps_the_pairs_already_explained(tmp_path, monkeypatch):
    from pairx_core.errors import NumericalError

    photos = _photos(tmp_path, ["a", "b", "c", "d"])
    items = [PairItem("p0", photos["a"], photos["b"]), PairItem("p1", photos["c"], photos["d"])]
    real_batch = engine_module._explain_batch
    calls = {"n": 0}

    def explain_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise NumericalError("LRP relevance is not finite")
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_explain_batch", explain_batch)
    summary = explain_module.explain_pairs_batch(items, _settings(tmp_path, memory_budget=1))
    assert (summary.done, summary.failed) == (1, 1)
    out = str(tmp_path / "out")
    assert list(read_table(out, "pairs")["pair_id"]) == ["p0"]
    assert read_table(out, "errors")[["item", "stage"]].values.tolist() == [["p1", "explain"]]
