"""A bad detector file stops `pairx nightly --detections` up front: exit 2, one line, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

MODEL = "timm:efficientnet_b0?size=64"

GOOD_DETECTION = {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.3, 0.3], "classifications": [["0", 0.8]]}


def _document(detection=None, **top):
    return {"info": {"format_version": "1.4"}, "detection_categories": {"1": "animal"},
            "classification_categories": {"0": "zebra"},
            "images": [{"file": "a.png", "detections": [GOOD_DETECTION]},
                       {"file": "cam/b.png", "detections": [GOOD_DETECTION, detection or GOOD_DETECTION]}], **top}


@pytest.fixture
def night(tmp_path, monkeypatch):
    from pairx_core.synthetic import make_individuals, render_photo

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # a flow that started would fail loudly
    for ind in make_individuals(2, seed=1):
        (tmp_path / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=(64, 64)).image.save(tmp_path / "gallery" / ind.id / "a.png")
    (tmp_path / "uploads" / "cam").mkdir(parents=True)
    return tmp_path


def _nightly(root, text: str, *extra: str):
    from flows.cli import app

    (root / "md.json").write_text(text)
    return CliRunner().invoke(app, ["nightly", "--uploads", str(root / "uploads"), "--gallery", str(root / "gallery"),
                                    "--out", str(root / "out"), "--model", MODEL, "--allow-random-weights",
                                    "--detections", str(root / "md.json"), *extra])


def _refused(root, result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert str(root / "md.json") in errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not (root / "out").exists()  # nothing written


@pytest.mark.parametrize("detection, fragments", [
    ({**GOOD_DETECTION, "bbox": [0.1, 0.2, 0.3]}, ("bbox must be 4 numbers",)),
    ({**GOOD_DETECTION, "bbox": [0.8, 0.1, 0.3, 0.3]}, ("leaves the photo",)),
    ({**GOOD_DETECTION, "bbox": [0.1, 0.1, 0.0, 0.3]}, ("zero or negative size",)),
    ({**GOOD_DETECTION, "category": "7"}, ("unknown category id '7'",)),
], ids=["bbox-not-4-numbers", "bbox-outside", "bbox-zero-size", "unknown-category"])
def test_a_bad_detection_is_named_by_image_and_index(night, detection, fragments):
    result = _nightly(night, json.dumps(_document(detection)))
    _refused(night, result, "image 'cam/b.png', detection 1", *fragments)


def test_text_that_is_not_json_is_refused(night):
    _refused(night, _nightly(night, "{images: oops"), "not a JSON file")


def test_a_file_without_images_is_refused(night):
    _refused(night, _nightly(night, json.dumps({"info": {"format_version": "1.4"}})), "no `images` list")


def test_a_species_no_category_names_is_refused(night):
    _refused(night, _nightly(night, json.dumps(_document()), "--species", "unicorn"),
             "no classification category is named 'unicorn'", "zebra")
