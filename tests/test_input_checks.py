"""Bad input refused before work starts: column types, boxes, angles, missing paths, layouts, roots."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from infra.images import decode_image
from infra.inputs import InputError, PathRules, list_gallery, list_uploads_counted, missing_paths, read_pairs
from pairx_core.errors import ImageError


def _png(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path)
    return path


def _parquet(path: Path, **columns) -> str:
    pd.DataFrame(columns).to_parquet(path)
    return str(path)


# ---------------------------------------------------------------------- column types
def test_a_float_image_column_is_refused_naming_file_column_and_row(tmp_path):
    table = _parquet(tmp_path / "pairs.parquet", image_0=["a.png", "b.png"], image_1=[1.5, 2.5])
    with pytest.raises(InputError) as raised:
        read_pairs(table, str(tmp_path))
    message = str(raised.value)
    assert table in message and "image_1" in message and "row 2" in message and "float" in message


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_one_number_box_is_refused_naming_file_column_and_row(tmp_path, kind):
    if kind == "csv":
        table = tmp_path / "pairs.csv"
        table.write_text("image_0,image_1,box_0\na.png,b.png,0 0 4 4\na.png,c.png,5\n")
        table, row = str(table), "row 3"
    else:
        table, row = _parquet(tmp_path / "pairs.parquet", image_0=["a.png"], image_1=["b.png"], box_0=[5.0]), "row 2"
    with pytest.raises(InputError) as raised:
        read_pairs(table, str(tmp_path))
    message = str(raised.value)
    assert table in message and "column box_0" in message and row in message and "4 numbers" in message


def test_theta_empty_is_no_rotation_but_nan_is_kept_for_an_error_row(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("image_0,image_1,theta_0,theta_1\na.png,b.png,,nan\n")
    item = read_pairs(str(table), str(tmp_path))[0]
    assert item.theta_0 == 0.0 and math.isnan(item.theta_1)  # not silently 0.0
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = str(tmp_path / "pairs.parquet")  # a null and a NaN, kept apart by the file
    pq.write_table(pa.table({"image_0": ["a.png", "a.png"], "image_1": ["b.png", "c.png"],
                             "theta_0": pa.array([None, float("nan")], type=pa.float64())}), parquet)
    null_row, nan_row = read_pairs(parquet, str(tmp_path))
    assert null_row.theta_0 == 0.0 and math.isnan(nan_row.theta_0)
    with pytest.raises(ImageError, match="theta must be finite"):  # what becomes the pair's errors row
        decode_image(_png(tmp_path / "a.png").read_bytes(), "a.png", theta=nan_row.theta_0)
    r_style = tmp_path / "r.csv"  # R writes NA for a missing value: no box, no rotation
    r_style.write_text("image_0,image_1,box_0,theta_0\na.png,b.png,NA,NA\n")
    assert read_pairs(str(r_style), str(tmp_path))[0].box_0 is None and read_pairs(str(r_style))[0].theta_0 == 0.0
    text = tmp_path / "text.csv"
    text.write_text("image_0,image_1,theta_0\na.png,b.png,left\n")
    with pytest.raises(InputError, match="row 2, column theta_0"):
        read_pairs(str(text), str(tmp_path))


# ---------------------------------------------------------------------- boxes
@pytest.mark.parametrize("box, fragment", [
    ((0, 0, 1e12, 1e12), "wrong units"),
    ((0, 0, 1e308, 1e308), "wrong units"),
    ((1e308, 0, 10, 10), "wrong units"),
    ((0, 0, float("inf"), 10), "finite"),
    ((10, 10, 2, 2), "at least 32 px"),
])
def test_absurd_and_tiny_boxes_are_image_errors_about_the_box(tmp_path, box, fragment):
    data = _png(tmp_path / "a.png").read_bytes()
    with pytest.raises(ImageError, match=fragment) as raised:
        decode_image(data, "a.png", box=box, min_side=32)
    assert getattr(raised.value, "content_hash", None) is None  # the file is fine: never quarantined


def test_a_jpeg_box_error_never_quarantines_the_file(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256)).save(buffer, "JPEG")
    with pytest.raises(ImageError) as raised:
        decode_image(buffer.getvalue(), "a.jpg", box=(0, 0, 1e12, 1e12), target_size=(32, 32))
    assert getattr(raised.value, "content_hash", None) is None


# ---------------------------------------------------------------------- missing paths
def test_missing_paths_list_each_folder_once(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    for name in ("a", "b", "c"):
        _png(tmp_path / "one" / f"{name}.png")
    _png(tmp_path / "two" / "d.png")
    calls = []
    original = LocalFileSystem.ls
    monkeypatch.setattr(LocalFileSystem, "ls",
                        lambda self, path, *a, **k: calls.append(path) or original(self, path, *a, **k))
    uris = [str(tmp_path / "one" / f"{n}.png") for n in "abcxy"] + [str(tmp_path / "two" / "d.png"),
                                                                   str(tmp_path / "gone" / "e.png")]
    assert missing_paths(uris) == [str(tmp_path / "one" / "x.png"), str(tmp_path / "one" / "y.png"),
                                   str(tmp_path / "gone" / "e.png")]
    assert len(calls) == 3  # one listing per folder, not one stat per row


def test_a_table_of_missing_paths_is_refused_before_any_model_loads(tmp_path):
    from flows.config import ExplainPairsConfig
    from flows.preflight import check_inputs

    _png(tmp_path / "photos" / "a.png")
    table = tmp_path / "pairs.csv"
    rows = ["image_0,image_1", "a.png,a.png"] + [f"a.png,nope-{i}.png" for i in range(200)]
    table.write_text("\n".join(rows) + "\n")
    config = ExplainPairsConfig(pairs=str(table), image_root=str(tmp_path / "photos"), out=str(tmp_path / "out"),
                                model="demo")
    with pytest.raises(InputError) as raised:
        check_inputs("explain_pairs", config)
    message = str(raised.value)
    assert "200 of the 201 images" in message and "--max-missing 5%" in message and "nope-0.png" in message
    assert check_inputs("explain_pairs", config.model_copy(update={"max_missing": 1.0})).counts == {
        "pairs": 201, "missing images": 200}


# ---------------------------------------------------------------------- roots
def test_urls_and_paths_outside_the_image_root_are_refused_per_row(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("image_0,image_1\n"
                     "a.png,b.png\n"
                     "http://example.org/x.png,b.png\n"
                     "file:///etc/passwd,b.png\n"
                     "s3://bucket/x.png,b.png\n"
                     "../../../etc/x.png,b.png\n"
                     "/etc/x.png,b.png\n"
                     "sub/../a.png,b.png\n")
    items = read_pairs(str(table), str(tmp_path / "root"))
    refusals = [item.refusal for item in items]
    assert refusals[0] is None and refusals[-1] is None
    assert all("--allow-urls" in r for r in refusals[1:4])
    assert all("--allow-outside-root" in r for r in refusals[4:6])
    allowed = read_pairs(str(table), str(tmp_path / "root"), rules=PathRules(allow_urls=True, allow_outside_root=True))
    assert all(item.refusal is None for item in allowed)
    assert allowed[1].image_0 == "http://example.org/x.png" and allowed[5].image_0 == "/etc/x.png"
    assert all(item.refusal is None for item in read_pairs(str(table)))  # no root: paths as written


def test_manifest_entries_stay_in_their_folder(tmp_path):
    manifest = tmp_path / "gallery" / "manifest.csv"
    _png(tmp_path / "gallery" / "a.png")
    manifest.write_text("image,individual\na.png,A\n../../secret.png,B\n")
    with pytest.raises(InputError, match="row 3: image ../../secret.png leaves the manifest's folder"):
        list_gallery(str(manifest))
    assert len(list_gallery(str(manifest), allow_outside_root=True)) == 2


# ---------------------------------------------------------------------- layouts
def test_a_flat_gallery_is_refused_unless_unlabelled(tmp_path):
    _png(tmp_path / "gallery" / "a.png")
    _png(tmp_path / "gallery" / "b.png")
    with pytest.raises(InputError) as raised:
        list_gallery(str(tmp_path / "gallery"))
    message = str(raised.value)
    assert "one sub-folder per individual" in message and "manifest CSV" in message
    assert "--unlabelled-gallery" in message
    assert list_gallery(str(tmp_path / "gallery"), unlabelled=True) == {
        str(tmp_path / "gallery" / "a.png"): "", str(tmp_path / "gallery" / "b.png"): ""}
    _png(tmp_path / "gallery" / "ind-a" / "c.png")
    _png(tmp_path / "gallery" / "results" / "viz" / "p.png")  # an output root inside: never listed
    assert sorted(list_gallery(str(tmp_path / "gallery"), exclude=str(tmp_path / "gallery" / "results")).values()) == [
        "", "", "ind-a"]


def test_unsupported_uploads_are_counted_by_suffix_and_a_gif_is_read(tmp_path):
    uploads = tmp_path / "uploads"
    _png(uploads / "a.png")
    Image.new("P", (40, 40)).save(uploads / "b.gif")
    for name in ("c.HEIC", "d.heic", "a.png.xmp", "notes"):
        (uploads / name).write_bytes(b"x")
    _png(uploads / "out" / "viz" / "p.png")  # an output root inside the folder is never listed
    listing = list_uploads_counted(str(uploads), exclude=str(uploads / "out"))
    assert [Path(u).name for u in listing.images] == ["a.png", "b.gif"]
    assert listing.unsupported == {"": 1, ".heic": 2, ".xmp": 1}
    assert decode_image((uploads / "b.gif").read_bytes(), "b.gif").size == (40, 40)  # first frame


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    from flows.config import NightlyConfig
    from flows.preflight import check_inputs

    _png(tmp_path / "gallery" / "ind-a" / "a.png")
    (tmp_path / "uploads").mkdir()
    for inside in ("uploads", "gallery"):
        config = NightlyConfig(uploads=str(tmp_path / "uploads"), gallery=str(tmp_path / "gallery"),
                               out=str(tmp_path / inside / "results"), model="demo")
        with pytest.raises(InputError, match=f"inside the {inside} folder"):
            check_inputs("nightly", config)


@pytest.mark.integration
def test_listed_sizes_on_s3(s3_bucket):
    from infra.inputs import listed_sizes
    from infra.storage import StorageTarget

    target = StorageTarget.from_url(f"s3://{s3_bucket}")
    target.write_bytes_atomic("photos/a.png", b"12345")
    target.write_bytes_atomic("photos/sub/b.png", b"123")
    uris = [f"s3://{s3_bucket}/photos/a.png", f"s3://{s3_bucket}/photos/nope.png", f"s3://{s3_bucket}/photos/sub/b.png",
            f"s3://{s3_bucket}/elsewhere/c.png"]
    assert listed_sizes(uris) == dict(zip(uris, [5, None, 3, None]))


@pytest.mark.integration
@pytest.mark.slow
def test_the_explain_flow_itself_refuses_a_table_of_missing_paths(prefect_harness, tmp_path):
    """Deployments skip the CLI's checks: the flow stops before any model loads."""
    from flows.config import ExplainPairsConfig
    from flows.explain_pairs import explain_pairs
    from infra.tables import read_table

    _png(tmp_path / "photos" / "a.png")
    table = tmp_path / "pairs.csv"
    table.write_text("image_0,image_1\n" + "".join(f"a.png,nope-{i}.png\n" for i in range(20)))
    config = ExplainPairsConfig(pairs=str(table), image_root=str(tmp_path / "photos"), out=str(tmp_path / "out"),
                                model="no-such-kind:never-built", workers=0)
    with pytest.raises(InputError, match="20 of the 21 images"):
        explain_pairs(config)
    runs = read_table(str(tmp_path / "out"), "runs")
    assert runs.status.tolist() == ["crashed"] and "20 of the 21 images" in runs.error.iloc[0]
