"""The gallery grows: uploads confirmed on earlier nights join the gallery of the next ones."""

from __future__ import annotations

import pytest

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def _config(root, out, **kwargs):
    from flows.config import NightlyConfig

    return NightlyConfig(uploads=str(root / "uploads"), gallery=str(root / "gallery"), out=str(out), model=MODEL,
                         layers=[LAYER], top_k=3, rerank_k=0, k_colors=0, k_lines=3, workers=0, report=False,
                         allow_random_weights=True, **kwargs)


@pytest.mark.integration
@pytest.mark.slow
def test_a_new_individual_decided_on_night_one_is_a_candidate_on_night_two(prefect_harness, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.nightly import nightly
    from infra.tables import read_table
    from pairx_core.synthetic import make_individuals, render_photo

    known, newcomer = make_individuals(3, seed=6)[:2], make_individuals(3, seed=6)[2]
    root = tmp_path / "night"
    for ind in known:
        (root / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=(64, 64)).image.save(root / "gallery" / ind.id / "a.png")
    (root / "uploads").mkdir()
    first_photo = root / "uploads" / "night1.png"
    render_photo(newcomer, seed=1, size=(64, 64)).image.save(first_photo)
    out = tmp_path / "out"
    assert nightly(_config(root, out))["done"] == 2  # two gallery individuals, neither the right one

    decided = CliRunner().invoke(app, ["decide", str(out), "--query", str(first_photo), "--new", "Nemo",
                                       "--reviewer", "ana"])
    assert decided.exit_code == 0, decided.output

    second_photo = root / "uploads" / "night2.png"
    render_photo(newcomer, seed=2, size=(64, 64)).image.save(second_photo)
    second = nightly(_config(root, out))
    assert second["done"] == 3 and second["cache"]["misses"] == 1  # the confirmed upload's embedding: cached
    candidates = read_table(str(out), "candidates")
    tonight = candidates[candidates["query"] == str(second_photo)]
    confirmed = tonight[tonight["gallery_image"] == str(first_photo)]
    assert confirmed[["individual", "gallery_source"]].values.tolist() == [["Nemo", "confirmed"]]
    assert set(tonight["gallery_source"]) == {"gallery", "confirmed"}
    assert (candidates["query"] == str(first_photo)).sum() == 2  # a decided upload is not a query again

    (root / "uploads" / "night3.png").write_bytes(second_photo.read_bytes())  # same animal, under a new name
    third = nightly(_config(root, out, confirmed=False))  # --no-confirmed: the folder gallery only
    rows = read_table(str(out), "candidates")
    assert set(rows[rows["query"] == str(root / "uploads" / "night3.png")]["gallery_source"]) == {"gallery"}
    assert len(rows[rows["query"] == str(root / "uploads" / "night3.png")]) == 2 and third["failed"] == 0
