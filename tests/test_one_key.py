"""One key once: two names of one content are one explanation, in the tables and in the views."""

from __future__ import annotations

import shutil

import pytest
from night_helpers import write_night

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def test_a_pairs_table_is_explained_once_per_content(tmp_path, monkeypatch):
    """Rows whose images have the same contents (other names) are one explanation, whatever batch
    they would land in; only images of a shared byte size are read."""
    from PIL import Image

    from infra import storage as storage_module
    from infra.inputs import PairItem
    from infra.keys import once_per_content

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(photos / "a.png")
    shutil.copy(photos / "a.png", photos / "copy-of-a.png")
    Image.new("RGB", (40, 40), (10, 10, 200)).save(photos / "g.png")
    shutil.copy(photos / "g.png", photos / "g-under-another-individual.png")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(photos / "other.png")  # a size of its own: never read
    reads = []
    original = storage_module.StorageTarget.read_bytes
    monkeypatch.setattr(storage_module.StorageTarget, "read_bytes",
                        lambda self, path: reads.append(self.root) or original(self, path))
    p = {name: str(photos / name) for name in ("a.png", "copy-of-a.png", "g.png", "g-under-another-individual.png",
                                                "other.png")}
    items = [PairItem("1", p["a.png"], p["g.png"]), PairItem("2", p["copy-of-a.png"], p["g.png"]),
             PairItem("3", p["a.png"], p["g-under-another-individual.png"]), PairItem("4", p["other.png"], p["g.png"]),
             PairItem("5", p["copy-of-a.png"], p["g.png"], box_0=(0, 0, 32, 32))]  # another crop: its own key
    unique, duplicates = once_per_content(items)
    assert [i.pair_id for i in unique] == ["1", "4", "5"] and [i.pair_id for i in duplicates] == ["2", "3"]
    assert p["other.png"] not in reads


def test_views_count_a_key_written_twice_once(tmp_path):
    """A key committed twice (outputs of older versions, a race) is one row in every view."""
    import duckdb

    from infra.tables import write_table
    from infra.views import create_views

    from infra.tables import TABLE_SCHEMAS

    def row(table: str, **values) -> dict:  # every column of the table, null unless given
        return {**{f.name: None for f in TABLE_SCHEMAS[table] if f.name not in ("model_id", "run_id", "created_at")},
                **values}

    out = str(tmp_path / "out")
    pair = {"pair_id": "p", "image_0": "u.png", "image_1": "g.png", "layer": LAYER, "similarity": 0.5, "irm": 0.1,
            "output_key": "k1", "model_spec": MODEL}
    match = {"pair_id": "p", "layer": LAYER, "rank": 0, "x_0": 1.0, "y_0": 1.0, "x_1": 2.0, "y_1": 2.0,
             "distance": 0.1, "relevance": 1.0, "output_key": "k1"}
    for commit in ("c1", "c2"):  # the same explanation committed by two batches
        write_table(out, "pairs", [row("pairs", **pair, commit_id=commit)], "m", f"run-{commit}")
        write_table(out, "matches", [row("matches", **match, commit_id=commit),
                                           row("matches", **{**match, "rank": 1}, commit_id=commit)],
                    "m", f"run-{commit}")
    write_table(out, "candidates", [row("candidates", query="u.png", rank=0, gallery_image="g.png", similarity=0.5,
                                         pair_id="p", layer=LAYER, output_key="k1")], "m", "run-c1")
    con = create_views(duckdb.connect(), out)
    assert con.sql("SELECT count(*) FROM pair_matches").fetchall()[0][0] == 2
    assert con.sql("SELECT count(*) FROM candidate_review").fetchall()[0][0] == 1
    assert con.sql("SELECT pairs FROM nights").fetchall()[0][0] == 1


@pytest.mark.integration
@pytest.mark.slow
def test_two_names_of_one_content_are_one_explanation(prefect_harness, tmp_path):
    """An upload under two names and a gallery photo under two individuals: each key once."""
    import duckdb

    from flows.config import NightlyConfig
    from flows.nightly import nightly
    from infra.tables import read_table
    from infra.views import create_views

    root = write_night(tmp_path / "night", 2, seed=3)
    shutil.copy(root / "uploads" / "ind-0000.png", root / "uploads" / "copy-of-0.png")
    (root / "gallery" / "ind-twin").mkdir()
    shutil.copy(root / "gallery" / "ind-0001" / "a.png", root / "gallery" / "ind-twin" / "a.png")
    out = tmp_path / "out"
    config = NightlyConfig(uploads=str(root / "uploads"), gallery=str(root / "gallery"), out=str(out), model=MODEL,
                           layers=[LAYER], top_k=3, rerank_k=0, k_colors=0, k_lines=3, batch_pairs=2, workers=0,
                           allow_random_weights=True)
    summary = nightly(config)
    pairs, candidates = read_table(str(out), "pairs"), read_table(str(out), "candidates")
    # 3 uploads x 3 gallery names = 9 candidates; 2 upload contents x 2 gallery contents = 4 keys
    assert len(candidates) == 9 and candidates.output_key.notna().all()
    assert len(pairs) == pairs.output_key.nunique() == 4 and summary["done"] == 4
    assert set(candidates.output_key) == set(pairs.output_key)
    by_query = candidates.set_index(["query", "gallery_image"]).output_key
    uploads, gallery = root / "uploads", root / "gallery"
    for image in ("ind-0000/a.png", "ind-0001/a.png", "ind-twin/a.png"):  # both names of the upload: one key
        assert by_query[(str(uploads / "ind-0000.png"), str(gallery / image))] == \
               by_query[(str(uploads / "copy-of-0.png"), str(gallery / image))]
    for upload in ("ind-0000.png", "ind-0001.png"):  # both individuals of the gallery photo: one key
        assert by_query[(str(uploads / upload), str(gallery / "ind-0001/a.png"))] == \
               by_query[(str(uploads / upload), str(gallery / "ind-twin/a.png"))]
    images = read_table(str(out), "images")
    assert len(images) == 6 and images.content_hash.nunique() == 4  # every name recorded, once
    con = create_views(duckdb.connect(), str(out))
    matches = read_table(str(out), "matches")
    assert con.sql("SELECT count(*) FROM pair_matches").fetchall()[0][0] == len(matches)
    assert con.sql("SELECT count(*) FROM candidate_review").fetchall()[0][0] == 9
    assert con.sql("SELECT count(*) FROM images").fetchall()[0][0] == 6
    again = nightly(config)  # a rerun explains nothing and writes no key twice
    assert again["done"] == 0 and len(read_table(str(out), "pairs")) == 4
