"""What a night counts as done or broken: an upload per name and content, gallery faults quarantined."""

from __future__ import annotations

import shutil

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def _config(root, out, **kwargs):
    from flows.config import NightlyConfig

    return NightlyConfig(uploads=str(root / "uploads"), gallery=str(root / "gallery"), out=str(out), model=MODEL,
                         layers=[LAYER], top_k=1, rerank_k=0, k_colors=0, k_lines=3, workers=0,
                         allow_random_weights=True, **kwargs)


def test_new_content_under_an_old_name_is_explained(prefect_harness, tmp_path):
    from flows.nightly import nightly
    from infra.tables import read_table
    from pairx_core.synthetic import make_individuals, render_photo

    root = write_night(tmp_path / "night", 2, seed=4, uploaders=1)
    out = tmp_path / "out"
    config = _config(root, out)
    assert nightly(config)["done"] == 1
    reused = root / "uploads" / "ind-0000.png"  # the next card's IMG_0001.JPG: same name, another photo
    render_photo(make_individuals(2, seed=4)[1], seed=7, size=(64, 64)).image.save(reused)
    second = nightly(config)
    assert second["done"] == 1 and second["skipped"] == 0
    images = read_table(str(out), "images")
    versions = images[images.image_uri == str(reused)]
    assert len(versions) == versions.content_hash.nunique() == 2  # both versions kept
    candidates = read_table(str(out), "candidates")
    assert candidates.query_hash.nunique() == 2 and set(candidates.query_hash) == set(versions.content_hash)
    third = nightly(config)  # that content is done now
    assert third["done"] == 0 and third["skipped"] == 1


def test_a_broken_gallery_image_fails_one_night_only(prefect_harness, tmp_path):
    from flows.common import ItemsFailedError
    from flows.nightly import nightly
    from infra.tables import read_table
    from pairx_core.synthetic import make_individuals, render_photo

    root = write_night(tmp_path / "night", 2, seed=6, uploaders=1)
    for sidecar in ("ind-0000.png.xmp", "IMG_0002.HEIC"):  # counted, never silently dropped
        (root / "uploads" / sidecar).write_bytes(b"x")
    broken = root / "gallery" / "ind-0001" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    config = _config(root, out)
    with pytest.raises(ItemsFailedError) as first:
        nightly(config)
    assert first.value.summary["failed"] == 1 and first.value.summary["done"] == 1
    assert first.value.summary["unsupported"] == {".heic": 1, ".xmp": 1}
    assert read_table(str(out), "runs").n_unsupported.tolist() == [2]
    render_photo(make_individuals(2, seed=6)[1], seed=2, size=(64, 64)).image.save(root / "uploads" / "new.png")
    second = nightly(config)  # a new upload, the same broken gallery image: skipped, not failed again
    assert second["status"] == "completed" and second["done"] == 1 and second["failed"] == 0
    assert second["gallery"] == 2  # the two good gallery images
    errors = read_table(str(out), "errors")
    assert (errors["item"] == str(broken)).sum() == 1  # one errors row, not one per night
    render_photo(make_individuals(2, seed=6)[0], seed=3, size=(64, 64)).image.save(root / "uploads" / "newer.png")
    with pytest.raises(ItemsFailedError):  # --retry-failed tries it again
        nightly(config.model_copy(update={"retry_failed": True}))


def test_explain_refuses_urls_and_paths_outside_the_root_per_row(prefect_harness, tmp_path):
    """Refused rows get an errors row each and are never read; the others are explained."""
    import pandas as pd

    from flows.common import ItemsFailedError
    from flows.config import ExplainPairsConfig
    from flows.explain_pairs import explain_pairs
    from infra.tables import read_table

    root = write_night(tmp_path / "night", 2, seed=8)
    shutil.copy(root / "uploads" / "ind-0000.png", root / "uploads" / "copy.png")
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"image_0": ["uploads/ind-0000.png", "http://127.0.0.1:9/x.png", "../night/uploads/ind-0001.png",
                              "uploads/copy.png"],
                  "image_1": ["gallery/ind-0000/a.png"] * 4, "pair_id": ["ok", "url", "outside", "copy"]}
                 ).to_csv(pairs, index=False)
    config = ExplainPairsConfig(pairs=str(pairs), image_root=str(root), out=str(tmp_path / "out"), model=MODEL,
                                layers=[LAYER], k_colors=0, k_lines=3, workers=0, batch_pairs=1,
                                allow_random_weights=True)
    with pytest.raises(ItemsFailedError) as raised:
        explain_pairs(config)
    summary = raised.value.summary  # the copy is one explanation with the original, in another batch or not
    assert summary["done"] == 1 and summary["failed"] == 2 and summary["skipped"] == 1
    errors = read_table(str(tmp_path / "out"), "errors")
    assert sorted(errors["item"]) == ["outside", "url"] and set(errors["stage"]) == {"input"}
    assert read_table(str(tmp_path / "out"), "pairs").pair_id.tolist() == ["ok"]


def test_a_transient_storage_error_is_counted_in_the_runs_row(prefect_harness, tmp_path, monkeypatch):
    from flows.nightly import nightly
    from infra.cache import ActivationCache
    from infra.storage import RetryPolicy
    from infra.tables import read_table

    monkeypatch.setattr(RetryPolicy, "default", classmethod(lambda cls: cls(attempts=3, first_delay_s=0.0)))
    real_get = ActivationCache.get_embeddings
    failures = []

    def flaky_get(self, hashes):
        if not failures:  # the first read of the night's embeddings times out once
            failures.append(1)
            raise TimeoutError("injected: storage read timed out")
        return real_get(self, hashes)

    monkeypatch.setattr(ActivationCache, "get_embeddings", flaky_get)
    root = write_night(tmp_path / "night", 2, seed=5, uploaders=1)
    out = tmp_path / "out"
    assert nightly(_config(root, out))["status"] == "completed"
    assert failures == [1]
    runs = read_table(str(out), "runs")
    assert len(runs) == 1 and runs.n_retries.iloc[0] >= 1
