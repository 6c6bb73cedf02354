"""Output rows: matches stored in original photo coordinates, skip planning, images, candidates and
runs rows."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from infra.images import decode_image
from infra.inputs import PairItem
from infra.keys import OutputSettings, plan_pairs
from infra.night_items import NightItem
from infra.records import RowContext, candidate_rows, explanation_rows, image_rows, query_item_columns, run_row
from infra.tables import TABLE_SCHEMAS, read_table
from pairx_core.retrieval import Candidate, PairOutcome, rank_candidates
from pairx_core.metrics import PlausibilityMetrics
from pairx_core.results import LayerExplanation, PairExplanation, matches_frame
from pairx_core.synthetic import make_individuals, render_photo
from tasks.explain import RunSettings, commit_batch

MODEL_INPUT = (440, 440)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _centroid(model_input: np.ndarray, colour, near: np.ndarray, radius: float) -> np.ndarray:
    """Where the model input shows a spot of ``colour`` near ``near``: centroid of its pixels,
    continuous coordinates (pixel j covers [j, j + 1))."""
    ys, xs = np.mgrid[0:model_input.shape[0], 0:model_input.shape[1]] + 0.5
    close = np.abs(model_input.astype(int) - np.asarray(colour)).max(axis=-1) <= 24
    window = (xs - near[0]) ** 2 + (ys - near[1]) ** 2 <= radius**2
    mask = close & window
    assert mask.sum() >= 20, "the spot is not visible in the model input"
    return np.array([xs[mask].mean(), ys[mask].mean()])


@pytest.fixture(scope="module")
def photos():
    individual = make_individuals(1, seed=3)[0]
    big = render_photo(individual, 1, (3000, 4000), clean=True, supersample=1)   # 4000 px wide
    small = render_photo(individual, 2, (600, 800), clean=True, supersample=1)
    return individual, big, small


def test_stored_matches_land_on_the_feature_in_a_4000_px_photo(photos, tmp_path):
    individual, big, small = photos
    # decoded as the pipeline decodes it: a reduced-scale JPEG decode, then resized to the model input
    images = [decode_image(_jpeg(p.image), f"{name}.jpg", target_size=MODEL_INPUT) for name, p in
              (("big", big), ("small", small))]
    assert images[0].decode_scale > 1 and images[0].original_size == (4000, 3000)
    inputs = [np.asarray(im.image.resize(MODEL_INPUT[::-1], Image.BILINEAR)) for im in images]
    spots = [i for i in range(len(individual.spots)) if all(
        p.visible_mask[int(y), int(x)] for p in (big, small)
        for x, y in [p.spot_pixels()[i]] if 0 <= x < p.size[1] and 0 <= y < p.size[0])][:3]
    assert len(spots) == 3
    ends = []  # per spot: where each model input shows it (the match an engine would draw)
    for i in spots:
        colour, row = individual.spots[i].colour, []
        for photo, model_input in zip((big, small), inputs):
            factor = np.array([MODEL_INPUT[1] / photo.size[1], MODEL_INPUT[0] / photo.size[0]])
            radius = individual.spots[i].radius * np.linalg.norm(photo.transform[:2, :2], 2) * factor.min()
            row.append(_centroid(model_input, colour, photo.spot_pixels()[i] * factor, 0.8 * radius))
        ends.append(np.concatenate(row))
    ends = np.array(ends)
    n = len(ends)
    frame = matches_frame({"rank": np.arange(n), "row_0": np.zeros(n), "col_0": np.zeros(n), "row_1": np.zeros(n),
                           "col_1": np.zeros(n), "x_0": ends[:, 0], "y_0": ends[:, 1], "x_1": ends[:, 2],
                           "y_1": ends[:, 3], "distance": np.ones(n), "relevance": np.linspace(1, 0.5, n)})
    layer = LayerExplanation("l", np.ones((2, 2)), np.ones((2, 2)), frame, np.zeros((0, 2, 2)),
                             np.zeros((0, 2, 2)), (8, 14, 14), MODEL_INPUT, k_lines=10)
    result = PairExplanation(0, 0.9, np.zeros(3), np.zeros(3), {"l": layer})
    metrics = PlausibilityMetrics(n, 0.0, n, 1.0, 0.5, 0.5, 0.1)
    item = PairItem("p", "big.jpg", "small.jpg")
    context = RowContext("run", "commit", "spec", 10)
    pairs, matches = explanation_rows(item, result, tuple(images), {"l": metrics}, {"l": "key"}, {"l": None}, context)
    settings = RunSettings(out=str(tmp_path / "out"), model="spec", layers=("l",), run_id="run")
    commit_batch(settings, "m", {"matches": matches}, pairs, [])
    stored = read_table(settings.out, "matches").sort_values("rank")
    truth_0 = big.spot_pixels()[spots]
    truth_1 = small.spot_pixels()[spots]
    # within a pixel of the feature at full resolution (a half-pixel shift would put the 4000 px
    # photo's ends about 4 px right and 3 px down)
    assert np.abs(stored[["x_0", "y_0"]].to_numpy() - truth_0).max() < 1.0
    assert np.abs(stored[["x_1", "y_1"]].to_numpy() - truth_1).max() < 0.5
    assert list(read_table(settings.out, "pairs")["output_key"]) == ["key"]


def test_plan_pairs_skips_existing_and_fails_unloadable_pairs():
    items = [PairItem("new", "a", "b"), PairItem("done", "a", "c"), PairItem("broken", "a", "x"),
             PairItem("cropped", "a", "c", box_1=(1, 2, 3, 4))]
    hashes = {("a", None, 0.0): "ha", ("b", None, 0.0): "hb", ("c", None, 0.0): "hc", ("c", (1, 2, 3, 4), 0.0): "hc"}
    settings = OutputSettings("model", ("l1", "l2"), 20, 10, "engine-1", {"prep": "p"})
    existing = set(settings.output_keys(items[1], "ha", "hc").values())
    plan = plan_pairs(items, hashes, existing, settings)
    assert [p.item.pair_id for p in plan.todo] == ["new", "cropped"]  # the crop changes the key
    assert [i.pair_id for i in plan.skipped] == ["done"] and [i.pair_id for i in plan.unloadable] == ["broken"]
    assert set(plan.todo[0].output_keys) == {"l1", "l2"}
    # one layer missing: the pair is computed again
    partial = {settings.output_keys(items[1], "ha", "hc")["l1"]}
    assert [p.item.pair_id for p in plan_pairs(items[1:2], hashes, partial, settings).todo] == ["done"]


def test_image_rows_one_per_name_and_content():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "PNG")
    same = [decode_image(buffer.getvalue(), uri) for uri in ("u1.png", "u2.png", "u1.png")]
    rows = image_rows(same, set(), "run")  # two names of one content: both names recorded, once each
    assert [(r["image_uri"], r["width"], r["height"]) for r in rows] == [("u1.png", 40, 30), ("u2.png", 40, 30)]
    assert image_rows(same, {("u1.png", same[0].content_hash)}, "run")[0]["image_uri"] == "u2.png"
    other = io.BytesIO()
    Image.new("RGB", (50, 30)).save(other, "PNG")
    replaced = decode_image(other.getvalue(), "u1.png")  # new bytes under a known name: a new version
    known = {(r["image_uri"], r["content_hash"]) for r in rows}
    assert [(r["image_uri"], r["width"]) for r in image_rows([replaced], known, "run")] == [("u1.png", 50)]


def test_plan_pairs_plans_each_key_once():
    """Two names of one content in one batch are one explanation: the second is skipped."""
    items = [PairItem("a-g", "a", "g"), PairItem("copy-g", "copy-of-a", "g"), PairItem("a-g2", "a", "g2")]
    hashes = {("a", None, 0.0): "ha", ("copy-of-a", None, 0.0): "ha", ("g", None, 0.0): "hg",
              ("g2", None, 0.0): "hg"}  # g2: the same gallery photo under another individual
    settings = OutputSettings("model", ("l1",), 20, 10, "engine-1", {})
    plan = plan_pairs(items, hashes, set(), settings)
    assert [p.item.pair_id for p in plan.todo] == ["a-g"]
    assert [i.pair_id for i in plan.skipped] == ["copy-g", "a-g2"]


#: columns the table writer fills (never built by a row builder)
WRITER_COLUMNS = {"model_id", "run_id", "created_at"}


def _fits(value, kind: pa.DataType) -> bool:
    """Whether a non-null Python ``value`` is what a column of arrow type ``kind`` holds, unconverted."""
    if pa.types.is_boolean(kind):
        return isinstance(value, bool)
    if pa.types.is_integer(kind):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(kind):
        return isinstance(value, float)
    if pa.types.is_string(kind):
        return isinstance(value, str)
    if pa.types.is_timestamp(kind):
        return isinstance(value, datetime) and value.tzinfo is not None
    if pa.types.is_list(kind):
        return isinstance(value, list) and all(_fits(v, kind.value_type) for v in value)
    raise AssertionError(f"no check for {kind}")


def _assert_matches_schema(rows: list[dict], table: str) -> None:
    schema = TABLE_SCHEMAS[table]
    for row in rows:
        assert set(row) <= set(schema.names), set(row) - set(schema.names)
        assert set(schema.names) - set(row) <= WRITER_COLUMNS, set(schema.names) - set(row) - WRITER_COLUMNS
        wrong = {name: value for name, value in row.items()
                 if value is not None and not _fits(value, schema.field(name).type)}
        assert not wrong, wrong
    pa.Table.from_pylist(rows, schema=pa.schema([schema.field(name) for name in rows[0]]))


def test_candidate_rows_have_the_table_columns_and_types():
    candidates = [Candidate("q", "g1", 0.9, "p1", "ann"), Candidate("q", "g2", 0.8, "p2", None)]
    outcomes = {"p1": PairOutcome("l", irm=0.1, viz_uri="v1", output_key="k1"), "p2": PairOutcome("l", irm=0.9)}
    ranked = rank_candidates(candidates, outcomes)
    plain = candidate_rows(ranked, "timm:x?token=secret")
    assert [r["gallery_image"] for r in plain] == ["g2", "g1"] and [r["rank"] for r in plain] == [0, 1]
    assert plain[0]["explained"] is None and plain[0]["retrieval_rank"] is None and "secret" not in str(plain)
    _assert_matches_schema(plain, "candidates")
    stage1 = {"p1": {"n_matches": 7, "inliers": 5, "residual_px": 1.5, "match_coverage": 0.2,
                     "relevance_share": 0.3, "match_share": 0.1}}
    reranked = candidate_rows(ranked, "demo", retrieval_rank={"p1": 0, "p2": 1}, explained={"p1"}, stage1=stage1)
    assert [(r["retrieval_rank"], r["explained"], r["n_matches"]) for r in reranked] == [(1, False, None),
                                                                                        (0, True, 7)]
    _assert_matches_schema(reranked, "candidates")
    detection = NightItem("q", box=(0.1, 0.2, 0.3, 0.4), detection=1, conf=0.9, species="manta", tag="detection=1")
    for row in reranked:  # what a camera-trap night adds (top_k: every night): every column filled
        row.update(query_item_columns(detection, "a" * 64, (10, 20, 30, 40)), gallery_source="confirmed", top_k=1)
    assert all(value is not None for value in reranked[1].values())
    assert reranked[0]["query_box"] == [10.0, 20.0, 30.0, 40.0] and len(reranked[0]["query_detection_id"]) == 16
    _assert_matches_schema(reranked, "candidates")


@dataclass
class _Run:
    run_id: str = "run-1"
    status: str = "completed"
    error: str | None = "TimeoutError: https://user:pw@host/x"
    done: int = 2
    skipped: int = 1
    failed: int = 0
    seconds: float = 1.5
    workers: set = field(default_factory=lambda: {"w1"})
    model_facts: dict = field(default_factory=lambda: {"model_spec": "demo", "weights_digest": "d",
                                                       "random_weights": True})
    cache: dict = field(default_factory=lambda: {"hits": 1, "misses": 2, "damaged": 0})
    repaired_files: int = 0
    planned: dict = field(default_factory=lambda: {"unsupported": {".heic": 2},
                                                   "frames": {"n_frames": 3, "n_empty": 1, "n_detections": 2}})


def test_run_row_has_the_table_columns_and_types():
    now = datetime.now(timezone.utc)
    row = run_row("nightly", {"out": "/o", "top_k": 3}, _Run(), now, now, n_retries=4)
    assert row["n_retries"] == 4 and row["n_unsupported"] == 2 and row["n_detections"] == 2
    assert row["parameters"] == '{"out": "/o", "top_k": 3}' and "pw@" not in row["error"]
    _assert_matches_schema([row], "runs")
