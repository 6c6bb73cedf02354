"""Camera-trap detector output (infra.detections) and synthetic camera-trap frames
(pairx_core.synthetic.camera_trap)."""

from __future__ import annotations

import copy
import json
import uuid

import numpy as np
import pytest

from infra.detections import (
    DEFAULT_MIN_CONFIDENCE,
    Detection,
    DetectionFileError,
    detection_id,
    parse_detector_output,
    read_detections,
    resolve_photo,
    select_detections,
    write_detector_output,
)
from infra.inputs import InputError
from infra.storage import StorageTarget
from pairx_core.errors import ConfigError
from pairx_core.geometry import map_points
from pairx_core.synthetic import make_individuals
from pairx_core.synthetic.camera_trap import detector_output, make_frames, normalised_box, render_frame

URL = "/data/night/md.json"
UPLOADS = "/data/night/uploads"


def _document() -> dict:
    """Five frames: two with animals (three kept detections), two empty (one holds only a person and
    a detection below the file's threshold 0.25), one detector failure."""
    return {
        "info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt",
                 "detector_metadata": {"typical_detection_threshold": 0.25,
                                       "conservative_detection_threshold": 0.1}},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "classification_categories": {"0": "lion", "1": "zebra"},
        "images": [
            {"file": "cam1/IMG_0001.JPG", "detections": [
                {"category": "1", "conf": 0.93, "bbox": [0.1, 0.2, 0.3, 0.4],
                 "classifications": [["1", 0.7], ["0", 0.2]]},
                {"category": "1", "conf": 0.3, "bbox": [0.5, 0.5, 0.25, 0.25],
                 "classifications": [["1", 0.1], ["0", 0.85]]},
            ]},
            {"file": "cam1\\IMG_0002.JPG", "detections": [
                {"category": "2", "conf": 0.9, "bbox": [0.0, 0.0, 0.5, 1.0]},
                {"category": "1", "conf": 0.22, "bbox": [0.6, 0.1, 0.2, 0.2]},
            ]},
            {"file": "cam2/IMG_0003.JPG", "detections": []},
            {"file": "cam2/IMG_0004.JPG", "detections": [
                {"category": "1", "conf": 0.61, "bbox": [0.7, 0.6, 0.3, 0.4]},
            ]},
            {"file": "cam2/IMG_0005.JPG", "failure": "Failure image access", "detections": None},
        ],
    }


def _parse(document: dict):
    return parse_detector_output(json.dumps(document), URL)


def _select(document: dict, **options):
    return select_detections(_parse(document), URL, UPLOADS, **options)


def _raises(document: dict, **options) -> DetectionFileError:
    with pytest.raises(DetectionFileError) as caught:
        _select(document, **options)
    return caught.value


# ------------------------------------------------------------------------------ bad input
def test_text_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "md.json"
    path.write_text('{"images": [ {"file": "a.jpg", ')
    with pytest.raises(DetectionFileError) as caught:
        read_detections(str(path), str(tmp_path))
    assert str(caught.value).startswith(f"{path}: not a JSON file (line 1")
    assert isinstance(caught.value, InputError)  # the CLI's input error: exit code 2


def test_missing_and_empty_files_name_the_file(tmp_path):
    with pytest.raises(DetectionFileError, match="cannot read the detector output"):
        read_detections(str(tmp_path / "absent.json"), str(tmp_path))
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(DetectionFileError, match="empty"):
        read_detections(str(tmp_path / "empty.json"), str(tmp_path))


def test_input_errors_exit_with_code_2_at_the_cli():
    import typer

    from flows.cli import _preflight_error

    error = _raises({"info": {"format_version": "1.4"}})
    with pytest.raises(typer.Exit) as caught:
        _preflight_error(error)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("document", [{"info": {"format_version": "1.4"}}, {"images": {"a.jpg": []}}, []])
def test_no_images_list(document):
    with pytest.raises(DetectionFileError, match=r"no `images` list|`images` must be a list|JSON object"):
        parse_detector_output(json.dumps(document), URL)


@pytest.mark.parametrize("bbox, reason", [
    ([0.1, 0.2, 0.3], "must be 4 numbers"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], "must be 4 numbers"),
    ("0.1 0.2 0.3 0.4", "must be 4 numbers"),
    ([0.1, "0.2", 0.3, 0.4], "must be 4 numbers"),
    ([0.1, True, 0.3, 0.4], "must be 4 numbers"),
    (None, "must be 4 numbers"),
    ([-0.01, 0.2, 0.3, 0.4], "leaves the photo"),
    ([0.8, 0.2, 0.3, 0.4], "leaves the photo"),
    ([0.1, 1.2, 0.3, 0.1], "leaves the photo"),
    ([0.1, 0.2, 0.0, 0.4], "zero or negative size"),
    ([0.1, 0.2, 0.3, -0.1], "zero or negative size"),
])
def test_bad_bbox_names_image_and_detection(bbox, reason):
    document = _document()
    document["images"][3]["detections"][0]["bbox"] = bbox
    error = _raises(document)
    assert reason in str(error)
    assert (error.uri, error.image, error.detection) == (URL, "cam2/IMG_0004.JPG", 0)
    assert str(error).startswith(f"{URL}: image 'cam2/IMG_0004.JPG', detection 0: ")


def test_bbox_outside_by_rounding_only_is_accepted_and_clipped_in_pixels():
    document = _document()
    document["images"][3]["detections"][0]["bbox"] = [0.7004, 0.6, 0.3005, 0.4009]  # right edge 1.0009
    detection = _select(document).detections[-1]
    assert detection.bbox == (0.7004, 0.6, 0.3005, 0.4009)
    assert detection.pixel_box((1000, 500)) == (700, 300, 300, 200)


def test_unknown_category_id_names_image_and_detection():
    document = _document()
    document["images"][1]["detections"][1]["category"] = "7"
    error = _raises(document)
    assert (error.image, error.detection) == ("cam1\\IMG_0002.JPG", 1)
    assert "unknown category id '7'" in str(error) and "1 animal, 2 person, 3 vehicle" in str(error)
    document = _document()
    document["images"][0]["detections"][0]["classifications"] = [["9", 0.9]]
    error = _raises(document)
    assert (error.image, error.detection) == ("cam1/IMG_0001.JPG", 0)
    assert "unknown classification category id '9'" in str(error)


def test_the_first_offending_entry_is_named_whatever_the_problem():
    document = _document()
    document["images"][0]["detections"][1]["category"] = "7"  # a wrong reference first,
    document["images"][3]["detections"][0]["bbox"] = [0.1, 0.2]  # a malformed entry later
    error = _raises(document)
    assert (error.image, error.detection) == ("cam1/IMG_0001.JPG", 1) and "unknown category id" in str(error)
    document["images"][0]["detections"][1]["category"] = "1"
    assert (_raises(document).image, _raises(document).detection) == ("cam2/IMG_0004.JPG", 0)


def test_species_that_no_classification_category_names():
    error = _raises(_document(), species="tiger")
    assert "no classification category is named 'tiger' (lion, zebra)" in str(error)
    document = _document()
    del document["classification_categories"]
    for image in document["images"]:
        for detection in image.get("detections") or []:
            detection.pop("classifications", None)
    assert "the file has no classification_categories" in str(_raises(document, species="lion"))


def test_other_bad_entries_are_named():
    document = _document()
    document["images"][2] = {"file": "cam2/IMG_0003.JPG"}
    error = _raises(document)
    assert error.image == "cam2/IMG_0003.JPG" and "neither a `detections` list nor a `failure`" in str(error)
    document = _document()
    document["images"][0]["detections"][1]["conf"] = 1.5
    error = _raises(document)
    assert (error.image, error.detection) == ("cam1/IMG_0001.JPG", 1) and "conf" in str(error)
    document = _document()
    document["images"][3]["file"] = "cam1/IMG_0001.JPG"
    assert "listed twice (image entries 0 and 3)" in str(_raises(document))
    document = _document()
    document["info"]["format_version"] = "2.0"
    assert "format_version '2.0'" in str(_raises(document))
    with pytest.raises(DetectionFileError, match="no detection category is named 'animals'"):
        _select(_document(), category="animals")
    with pytest.raises(ConfigError, match="min_confidence"):
        _select(_document(), min_confidence=1.5)


# ------------------------------------------------------------------------------ selection and counts
def test_default_selection_uses_the_files_threshold_and_counts_frames():
    selection = _select(_document())
    assert selection.min_confidence == 0.25 and selection.category == "animal"
    assert [(d.file, d.index, d.conf) for d in selection.detections] == [
        ("cam1/IMG_0001.JPG", 0, 0.93), ("cam1/IMG_0001.JPG", 1, 0.3), ("cam2/IMG_0004.JPG", 0, 0.61)]
    counts = selection.counts
    assert (counts.n_frames, counts.n_empty, counts.n_detections, counts.n_failures) == (5, 2, 3, 1)
    assert selection.empty == (f"{UPLOADS}/cam1/IMG_0002.JPG", f"{UPLOADS}/cam2/IMG_0003.JPG")
    assert [(f.uri, f.failure) for f in selection.failures] == [
        (f"{UPLOADS}/cam2/IMG_0005.JPG", "Failure image access")]
    assert selection.summary == "5 frames: 2 with animals (3 detections), 2 empty, 1 detector failure"
    assert list(selection.by_photo()) == [f"{UPLOADS}/cam1/IMG_0001.JPG", f"{UPLOADS}/cam2/IMG_0004.JPG"]


def test_threshold_without_file_default_and_explicit():
    document = _document()
    del document["info"]["detector_metadata"]
    selection = _select(document)
    assert selection.min_confidence == DEFAULT_MIN_CONFIDENCE == 0.2
    assert [(d.file, d.index) for d in selection.detections][-2:] == [
        ("cam1\\IMG_0002.JPG", 1), ("cam2/IMG_0004.JPG", 0)]
    selection = _select(_document(), min_confidence=0.5)
    assert [(d.file, d.index) for d in selection.detections] == [("cam1/IMG_0001.JPG", 0), ("cam2/IMG_0004.JPG", 0)]
    assert selection.counts.n_empty == 2 and selection.counts.n_detections == 2


def test_category_and_species_selection():
    people = _select(_document(), category="person")
    assert [(d.file, d.index, d.category) for d in people.detections] == [("cam1\\IMG_0002.JPG", 0, "person")]
    assert people.summary == "5 frames: 1 with persons (1 detection), 3 empty, 1 detector failure"
    lions = _select(_document(), species="Lion")  # top classification (highest conf), any case
    assert [(d.file, d.index, d.species, d.species_conf) for d in lions.detections] == [
        ("cam1/IMG_0001.JPG", 1, "lion", 0.85)]
    assert lions.counts.n_empty == 3  # the unclassified detection of IMG_0004 is not a lion
    zebras = _select(_document(), species="zebra")
    assert [d.index for d in zebras.detections] == [0] and zebras.detections[0].species == "zebra"
    assert _select(_document()).detections[2].species is None


def test_integer_ids_and_numeric_format_version_are_read():
    document = _document()
    document["info"]["format_version"] = 1.0
    document["detection_categories"] = {1: "animal", 2: "person"}
    document["images"][0]["detections"][0]["category"] = 1
    assert _parse(document).info.format_version == "1.0"
    assert _select(document).detections[0].category == "animal"


# ------------------------------------------------------------------------------ paths
def test_relative_backslash_absolute_and_url_paths():
    root = StorageTarget.from_url(UPLOADS)
    assert resolve_photo("cam1/a.jpg", root) == f"{UPLOADS}/cam1/a.jpg"
    assert resolve_photo("cam1\\sub\\a.jpg", root) == f"{UPLOADS}/cam1/sub/a.jpg"
    assert resolve_photo("./cam1//a.jpg", root) == f"{UPLOADS}/cam1/a.jpg"
    assert resolve_photo("/elsewhere/a.jpg", root) == "/elsewhere/a.jpg"
    assert resolve_photo("s3://bucket/cam1/a.jpg", root) == "s3://bucket/cam1/a.jpg"
    for bad, reason in (("C:\\traps\\a.jpg", "Windows absolute path"), ("\\\\server\\a.jpg", "Windows"),
                        ("../other/a.jpg", "leaves the uploads folder")):
        with pytest.raises(ValueError, match=reason):
            resolve_photo(bad, root)
    document = _document()
    document["images"][2]["file"] = "..\\secret.jpg"
    error = _raises(document)
    assert error.image == "..\\secret.jpg" and "leaves the uploads folder" in str(error)


def test_read_from_a_memory_url_resolves_against_remote_uploads():
    root = StorageTarget.from_url(f"memory://md-{uuid.uuid4().hex}")
    try:
        written = write_detector_output(root.join("md.json"), _document())
        selection = read_detections(written, root.join("uploads"))
        assert selection.source == written == root.join("md.json")
        assert selection.detections[0].uri == root.join("uploads/cam1/IMG_0001.JPG")
        assert selection.empty[0] == root.join("uploads/cam1/IMG_0002.JPG")  # back slashes turned
        assert selection.counts.n_detections == 3
    finally:
        root.delete("", recursive=True)


# ------------------------------------------------------------------------------ identity
def _ids(document: dict, content_hashes: dict[str, str]) -> list[str]:
    return [d.identity(content_hashes[d.file]) for d in _select(document, min_confidence=0.0).detections]


def test_identity_is_stable_and_changes_only_for_a_moved_box():
    hashes = {"cam1/IMG_0001.JPG": "a" * 64, "cam1\\IMG_0002.JPG": "b" * 64, "cam2/IMG_0004.JPG": "c" * 64}
    first = _ids(_document(), hashes)
    assert first == _ids(json.loads(json.dumps(_document())), hashes)  # same JSON -> same ids
    assert len(set(first)) == len(first) == 4
    revised = _document()
    revised["images"][0]["detections"][1]["bbox"] = [0.5, 0.5, 0.25, 0.3]  # one box moved
    revised["images"][3]["detections"][0]["conf"] = 0.95  # a new confidence is no new detection
    second = _ids(revised, hashes)
    assert [a == b for a, b in zip(first, second)] == [True, False, True, True]
    new_bytes = _ids(_document(), {**hashes, "cam1/IMG_0001.JPG": "d" * 64})  # IMG_0001 rewritten
    assert [a == b for a, b in zip(first, new_bytes)] == [False, False, True, True]
    assert detection_id("a" * 64, 0, [0.1, 0.2, 0.3, 0.4]) != detection_id("a" * 64, 1, [0.1, 0.2, 0.3, 0.4])
    assert detection_id("a" * 64, 0, [0.1, 0.2, 0.3, 0.4]) == detection_id("a" * 64, 0, (0.1 + 1e-12, 0.2, 0.3, 0.4))
    with pytest.raises(ConfigError):
        detection_id("", 0, [0.1, 0.2, 0.3, 0.4])


def test_pixel_box_rounds_corners_and_keeps_one_pixel():
    detection = Detection(uri="u", file="f", index=0, bbox=(0.1, 0.2, 0.3, 0.4), conf=0.9, category="animal")
    assert detection.pixel_box((640, 480)) == (64, 96, 192, 192)
    tiny = Detection(uri="u", file="f", index=0, bbox=(0.9999, 0.5, 0.0001, 0.0001), conf=0.9, category="animal")
    assert tiny.pixel_box((100, 100)) == (99, 50, 1, 1)


# ------------------------------------------------------------------------------ synthetic frames
@pytest.fixture(scope="module")
def night():
    individuals = make_individuals(4, seed=11)
    frames = make_frames(individuals, 4, seed=5, size=(200, 280), crop_size=(80, 80), animal_counts=[2, 0, 3, 1])
    return individuals, frames


def test_frames_hold_the_crops_unchanged_at_their_boxes(night):
    _, frames = night
    assert [len(f.animals) for f in frames] == [2, 0, 3, 1]
    for frame in frames:
        assert frame.size == (200, 280)
        pixels = np.asarray(frame.image)
        boxes = [a.box for a in frame.animals]
        for animal in frame.animals:
            x, y, w, h = animal.box
            assert 0 <= x and x + w <= 280 and 0 <= y and y + h <= 200 and (w, h) == (80, 80)
            assert np.array_equal(pixels[y:y + h, x:x + w], np.asarray(animal.photo.image))
            spots = animal.photo.individual.spot_centres
            assert np.allclose(map_points(animal.transform, spots), animal.photo.to_pixels(spots) + [x, y])
        for i, (x0, y0, w0, h0) in enumerate(boxes):  # apart from each other
            for x1, y1, w1, h1 in boxes[i + 1:]:
                assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0
    again = make_frames(night[0], 4, seed=5, size=(200, 280), crop_size=(80, 80), animal_counts=[2, 0, 3, 1])
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(frames, again))


def test_frames_refuse_what_does_not_fit(night):
    individuals, _ = night
    with pytest.raises(ConfigError, match="does not fit"):
        render_frame(individuals[:1], 0, size=(64, 64), crop_size=(80, 80))
    with pytest.raises(ConfigError, match="cannot place"):
        render_frame(individuals[:3], 0, size=(100, 100), crop_size=(80, 80))
    with pytest.raises(ConfigError, match="animals per frame"):
        make_frames(individuals[:2], 1, seed=0, animal_counts=[3])


def test_synthetic_detector_output_reads_back_with_true_boxes(night, tmp_path):
    _, frames = night
    files = [f"cam{i % 2}\\frame_{i}.jpg" for i in range(len(frames))]
    url = write_detector_output(str(tmp_path / "md.json"), detector_output(frames, files, seed=3))
    selection = read_detections(url, str(tmp_path / "uploads"))
    counts = selection.counts
    # 4 frames + the failed one; the false detection of frame 0 is below the file's threshold
    assert (counts.n_frames, counts.n_empty, counts.n_detections, counts.n_failures) == (5, 1, 6, 1)
    assert selection.summary == "5 frames: 3 with animals (6 detections), 1 empty, 1 detector failure"
    assert selection.failures[0].file == "unreadable.jpg"
    by_file = {file: frame for file, frame in zip(files, frames)}
    for detection in selection.detections:
        frame = by_file[detection.file]
        animal = frame.animals[detection.index]
        height, width = frame.size
        assert detection.pixel_box((width, height)) == animal.box
        assert detection.species == animal.photo.individual.body.kind
    everything = read_detections(url, str(tmp_path / "uploads"), min_confidence=0.0)
    false = [d for d in everything.detections if d.index >= len(by_file[d.file].animals)]
    assert len(false) == 1 and false[0].file == files[0] and false[0].conf < 0.2
    x, y, w, h = false[0].pixel_box((280, 200))
    for animal in frames[0].animals:  # on bare background
        ax, ay, aw, ah = animal.box
        assert x + w <= ax or ax + aw <= x or y + h <= ay or ay + ah <= y


def test_normalised_box_round_trips_to_pixels():
    assert normalised_box((14, 79, 96, 96), (240, 320)) == [0.0437, 0.3292, 0.3, 0.4]
    detection = Detection(uri="u", file="f", index=0, bbox=tuple(normalised_box((14, 79, 96, 96), (240, 320))),
                          conf=0.9, category="animal")
    assert detection.pixel_box((320, 240)) == (14, 79, 96, 96)


def test_a_failure_wins_over_detections_and_needs_none():
    document = _document()
    document["images"][3]["failure"] = "Failure image access"  # detections kept in the entry
    del document["images"][4]["detections"]
    counts = _select(document).counts
    assert (counts.n_frames, counts.n_empty, counts.n_detections, counts.n_failures) == (5, 2, 2, 2)


def test_errors_survive_pickling_with_their_location():
    import pickle

    document = _document()
    document["images"][3]["detections"][0]["bbox"] = [0.1, 0.2, 0.3]
    error = pickle.loads(pickle.dumps(_raises(document)))
    assert isinstance(error, DetectionFileError)
    assert (error.uri, error.image, error.detection) == (URL, "cam2/IMG_0004.JPG", 0)
    assert str(error).startswith(f"{URL}: image 'cam2/IMG_0004.JPG', detection 0: bbox must be 4 numbers")


def test_document_is_not_changed_by_reading():
    document = _document()
    before = copy.deepcopy(document)
    _select(document)
    assert document == before
