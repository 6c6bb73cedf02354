"""Camera-trap nights: full frames and a detector file in, one upload per detection out."""

from __future__ import annotations

import json

import pytest

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


def _scene(root, n_individuals=3, counts=(2, 2, 0), seed=5):
    """Gallery folder, full frames with pasted crops, the same crops alone, and a detector file."""
    from infra.detections import write_detector_output
    from pairx_core.synthetic import make_individuals, render_photo
    from pairx_core.synthetic.camera_trap import detector_output, make_frames

    individuals = make_individuals(n_individuals, seed=seed)
    for ind in individuals:
        (root / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=(64, 64)).image.save(root / "gallery" / ind.id / "a.png")
    frames = make_frames(individuals, len(counts), seed, size=(150, 200), crop_size=(64, 64), animal_counts=counts)
    (root / "frames").mkdir()
    (root / "crops").mkdir()
    files = []
    for i, frame in enumerate(frames):
        files.append(f"frame-{i}.png")
        frame.image.save(root / "frames" / files[-1])
        for j, animal in enumerate(frame.animals):
            animal.photo.image.save(root / "crops" / f"frame-{i}-{j}.png")
    document = detector_output(frames, files, seed=seed)
    write_detector_output(str(root / "md.json"), document)
    return frames, document


def _config(root, out, uploads, **kwargs):
    from flows.config import NightlyConfig

    settings = dict(layers=[LAYER], top_k=1, rerank_k=3, k_colors=0, k_lines=3, workers=0, report=False,
                    allow_random_weights=True)
    return NightlyConfig(uploads=str(root / uploads), gallery=str(root / "gallery"), out=str(out), model=MODEL,
                         **{**settings, **kwargs})


@pytest.mark.integration
@pytest.mark.slow
def test_frames_with_detections_rank_like_the_crops_alone(prefect_harness, tmp_path):
    from flows.nightly import nightly
    from infra.tables import read_table

    root = tmp_path / "night"
    frames, document = _scene(root)
    config = _config(root, tmp_path / "out", "frames", detections=str(root / "md.json"))
    first = nightly(config)
    assert first["done"] == 4 and first["frames"] == {"n_frames": 4, "n_empty": 1, "n_detections": 4,
                                                     "n_failures": 1}
    assert first["detections"] == "4 frames: 2 with animals (4 detections), 1 empty, 1 detector failure"
    alone = nightly(_config(root, tmp_path / "alone", "crops"))
    assert alone["done"] == 4

    out = str(tmp_path / "out")
    candidates = read_table(out, "candidates")
    assert len(candidates) == 12  # stage 1 judged 3 gallery images per detection
    candidates = candidates[candidates["rank"] == 0]
    reference = read_table(str(tmp_path / "alone"), "candidates")
    reference = reference[reference["rank"] == 0]
    top_alone = {q.rsplit("/", 1)[-1]: (g, sim) for q, g, sim in zip(reference["query"], reference["gallery_image"],
                                                                     reference["similarity"])}
    for row in candidates.itertuples():
        frame = row.query.rsplit("/", 1)[-1].removesuffix(".png")
        gallery_image, similarity = top_alone[f"{frame}-{row.query_detection}.png"]
        assert gallery_image == row.gallery_image and row.similarity == pytest.approx(similarity, abs=1e-4)
        animal = frames[int(frame.split("-")[1])].animals[row.query_detection]
        assert list(row.query_box) == [float(v) for v in animal.box]  # original pixels of the frame
        assert row.species == animal.photo.individual.body.kind and row.detection_conf > 0.2
    assert candidates.query_detection_id.nunique() == 4

    pairs = read_table(out, "pairs")
    matches = read_table(out, "matches").merge(pairs[["pair_id", "box_0", "box_1"]], on="pair_id")
    assert len(matches) > 0
    for row in matches.itertuples():  # full-frame pixels, inside the detection's box
        x, y, w, h = row.box_0
        assert x <= row.x_0 <= x + w and y <= row.y_0 <= y + h
    runs = read_table(out, "runs").sort_values("started_at")
    assert runs.iloc[-1][["n_frames", "n_empty", "n_detections"]].tolist() == [4, 1, 4]
    errors = read_table(out, "errors")
    detector_rows = errors[errors.stage == "detector"]
    assert detector_rows["item"].tolist() == [str(root / "frames" / "unreadable.jpg")]

    _check_review_site(out, frames)

    again = nightly(config)  # the same file: every detection done
    assert again["done"] == 0 and again["skipped"] == 4
    assert (read_table(out, "errors").stage == "detector").sum() == 1  # recorded once

    moved = json.loads((root / "md.json").read_text())
    box = moved["images"][1]["detections"][0]["bbox"]
    moved["images"][1]["detections"][0]["bbox"] = [box[0] + 0.005, box[1], box[2], box[3]]
    (root / "md.json").write_text(json.dumps(moved))
    revised = nightly(config)  # only the moved detection is new
    assert revised["done"] == 1 and revised["skipped"] == 3


def _check_review_site(out: str, frames) -> None:
    """Each detection is its own upload on the night page, shown in its frame with its box drawn."""
    import re
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from infra.report import build_report

    result = build_report(out)
    page = next(Path(p) for p in result.pages if p.endswith("index.html") and "/nights/" in p)
    text = page.read_text()
    assert "frame-0.png (detection 0)" in text and "frame-0.png (detection 1)" in text
    frames_shown = re.findall(r"<div class='frame'><a href='([^']+)'", text)
    assert len(frames_shown) == 4
    framed = np.asarray(Image.open(page.parent / frames_shown[0]).convert("RGB")).astype(int)
    red = (framed[..., 0] > 200) & (framed[..., 1] < 90) & (framed[..., 2] < 90)
    assert red.sum() > 100  # the box is drawn in


def _spy_decodes(monkeypatch) -> list[str]:
    """URIs of the photos decoded from now on (the one step where bytes become pixels)."""
    from infra import images
    from infra.decoded_photos import clear_decoded_photos

    clear_decoded_photos()
    decodes: list[str] = []
    real = images._open_checked
    monkeypatch.setattr(images, "_open_checked",
                        lambda data, uri, *a, **k: decodes.append(uri) or real(data, uri, *a, **k))
    return decodes


def test_embed_decodes_each_photo_once_and_keys_each_crop(tmp_path, monkeypatch):
    import tasks.embed as embed_module
    from infra.night_items import NightItem, crop_key
    from pairx_core.synthetic import make_individuals
    from pairx_core.synthetic.camera_trap import make_frames, normalised_box

    frame = make_frames(make_individuals(3, seed=2), 1, 2, size=(150, 220), crop_size=(64, 64),
                        animal_counts=[3])[0]
    path = tmp_path / "frame.png"
    frame.image.save(path)
    items = [NightItem(str(path), box=tuple(normalised_box(a.box, frame.size)), detection=j, tag=f"detection={j}")
             for j, a in enumerate(frame.animals)]
    decodes = _spy_decodes(monkeypatch)
    result = embed_module.embed_images(items, model=MODEL, cache_url=str(tmp_path / "cache"), layers=[LAYER],
                                       run_id="r", out=str(tmp_path / "out"), device="cpu")
    assert len(decodes) == 1 and result.decoded == 1  # three detections, one decode
    assert result.computed == 3 and len(set(result.hashes.values())) == 3  # one cache entry per crop
    assert set(result.contents.values()) == {crop_key(next(iter(result.contents.values())))}
    assert [result.boxes[item.name] for item in items] == [a.box for a in frame.animals]


def test_a_manifest_row_with_a_bad_box_is_named(tmp_path):
    from infra.inputs import InputError, manifest_rows

    (tmp_path / "gallery.csv").write_text("image,individual,box,theta\na.png,ind-a,0 0 10 10,\na.png,ind-b,1 2 3,0.1\n")
    with pytest.raises(InputError, match=r"gallery.csv: row 3: a box needs 4 numbers"):
        manifest_rows(str(tmp_path / "gallery.csv"))


@pytest.mark.integration
@pytest.mark.slow
def test_a_gallery_manifest_names_several_animals_of_one_photo(prefect_harness, tmp_path):
    from flows.nightly import nightly
    from infra.tables import read_table
    from pairx_core.synthetic import make_individuals
    from pairx_core.synthetic.camera_trap import make_frames

    individuals = make_individuals(2, seed=9)
    frame = make_frames(individuals, 1, 9, size=(150, 200), crop_size=(64, 64), animal_counts=[2])[0]
    (tmp_path / "gallery").mkdir()
    frame.image.save(tmp_path / "gallery" / "frame.png")
    rows = ["image,individual,box,theta"]
    for animal in frame.animals:  # one row per animal of the one photo, boxes in pixels
        rows.append(f"frame.png,{animal.individual_id},{' '.join(map(str, animal.box))},")
    (tmp_path / "gallery" / "gallery.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "uploads").mkdir()
    for animal in frame.animals:  # each animal photographed alone: exactly its gallery crop
        animal.photo.image.save(tmp_path / "uploads" / f"{animal.individual_id}.png")
    config = _config(tmp_path, tmp_path / "out", "uploads", rerank_k=0)
    config = config.model_copy(update={"gallery": str(tmp_path / "gallery" / "gallery.csv")})
    assert nightly(config)["done"] == 2
    candidates = read_table(str(tmp_path / "out"), "candidates")
    assert set(candidates.gallery_image) == {str(tmp_path / "gallery" / "frame.png")}
    for row in candidates.itertuples():  # each upload finds its own animal of the frame
        assert row.query.endswith(f"{row.individual}.png") and row.similarity == pytest.approx(1.0, abs=1e-5)
    pairs = read_table(str(tmp_path / "out"), "pairs")
    assert sorted(tuple(b) for b in pairs.box_1) == sorted(tuple(map(float, a.box)) for a in frame.animals)
    assert pairs.box_0.isna().all()


def test_a_listed_photo_that_is_missing_is_an_item_failure(tmp_path):
    from PIL import Image

    from flows.night_plan import current_hashes
    from infra.night_items import NightItem
    from infra.tables import read_table
    from tasks.embed import embed_images

    present = tmp_path / "frame.png"
    Image.new("RGB", (80, 60), (20, 90, 30)).save(present)
    gone = tmp_path / "gone.png"
    hashes = current_hashes(str(tmp_path / "out"), [str(present), str(gone)])
    assert list(hashes) == [str(present)]  # planning reads what is there, the rest is not done
    items = [NightItem(str(gone), box=(0.1, 0.1, 0.5, 0.5), detection=0, tag="detection=0"),
             NightItem(str(present), box=(0.0, 0.0, 0.6, 0.6), detection=0, tag="detection=0")]
    result = embed_images(items, model=MODEL, cache_url=str(tmp_path / "cache"), layers=[LAYER], run_id="r",
                          out=str(tmp_path / "out"), device="cpu")
    assert result.errors == 1 and list(result.hashes) == [items[1].name]
    errors = read_table(str(tmp_path / "out"), "errors")
    assert errors[["item", "stage"]].values.tolist() == [[str(gone), "load"]]


def test_an_explain_batch_decodes_a_frame_once_for_all_its_detections(tmp_path, monkeypatch):
    import tasks.explain as explain_module
    from infra.inputs import PairItem
    from infra.tables import read_table
    from pairx_core.synthetic import make_individuals, render_photo
    from pairx_core.synthetic.camera_trap import make_frames

    individuals = make_individuals(2, seed=3)
    frame = make_frames(individuals, 1, 3, size=(150, 200), crop_size=(64, 64), animal_counts=[2])[0]
    frame.image.save(tmp_path / "frame.png")
    render_photo(individuals[0], seed=0, size=(64, 64)).image.save(tmp_path / "gallery.png")
    items = [PairItem(f"p{j}", str(tmp_path / "frame.png"), str(tmp_path / "gallery.png"),
                      box_0=tuple(float(v) for v in animal.box)) for j, animal in enumerate(frame.animals)]
    decodes = _spy_decodes(monkeypatch)
    settings = explain_module.RunSettings(out=str(tmp_path / "out"), model=MODEL, layers=(LAYER,), run_id="r",
                                          k_lines=3, k_colors=0, device="cpu", render=False)
    summary = explain_module.explain_pairs_batch(items, settings)
    assert summary.done == 2 and sorted(decodes) == sorted([str(tmp_path / "frame.png"), str(tmp_path / "gallery.png")])
    pairs = read_table(str(tmp_path / "out"), "pairs")
    matches = read_table(str(tmp_path / "out"), "matches").merge(pairs[["pair_id", "box_0"]], on="pair_id")
    for row in matches.itertuples():  # full-frame pixels inside each detection's box
        x, y, w, h = row.box_0
        assert x <= row.x_0 <= x + w and y <= row.y_0 <= y + h
