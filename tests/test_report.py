"""The review site (infra.report) on tables written directly: structure, links, thumbnails, pages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.report import build_report
from infra.tables import TABLE_SCHEMAS, write_table
from infra.report.thumbs import ThumbWriter
from infra.viz import relative_to_out, viz_uri, write_png
from infra.records import candidate_rows
from pairx_core.retrieval import Candidate, PairOutcome, rank_candidates
from report_helpers import PageParser, parse_page, resolve, site_pages

MODEL = "m-0123456789abcdef"
LAYER = "backbone.blocks.3"


def _pair_row(pair_id, image_0, image_1, similarity, irm, uri, key):
    row = {"pair_id": pair_id, "image_0": image_0, "image_1": image_1, "layer": LAYER, "similarity": similarity,
            "n_matches": 30, "residual_px": None if irm is None else 1 / irm - 1, "inliers": None if irm is None else 9,
            "irm": irm, "match_coverage": 0.3, "relevance_share": 0.2, "match_share": 0.1, "viz_uri": uri,
            "box_0": [2.0, 2.0, 40.0, 30.0], "box_1": None, "theta_0": 0.0, "theta_1": 0.0, "model_spec": "demo",
            "output_key": key}
    return _complete("pairs", row)


def _complete(table, row):
    """``row`` with the schema's other nullable columns null (columns added to a schema later)."""
    return {**{f.name: None for f in TABLE_SCHEMAS[table] if f.nullable and f.name not in row}, **row}


def write_output(root: Path) -> str:
    """A night of 3 uploads x 3 candidates (2024-05-06) and an explain-only day (2024-05-07)."""
    out = str(root / "out")
    photos = root / "photos"
    photos.mkdir(parents=True)
    for name, colour in [("u0", "red"), ("u1", "green"), ("u2", "blue"), ("g0", "white"), ("g1", "gray"),
                         ("g2", "black")]:
        Image.new("RGB", (64, 48), colour).save(photos / f"{name}.png")
    pairs, candidates = [], []
    outcomes = {}
    for u in range(3):
        for g in range(3):
            pid, key = f"p{u}{g}", f"key-{u}{g}"
            uri = viz_uri(out, MODEL, pid, LAYER)
            write_png(None, uri, Image.new("RGB", (1200, 640), (40 * g, 80, 200)))
            irm = None if (u, g) == (2, 2) else 0.2 + 0.3 * g  # upload 2 falls back to similarity
            pairs.append(_pair_row(pid, str(photos / f"u{u}.png"), str(photos / f"g{g}.png"), 0.9 - 0.1 * g, irm,
                                   uri, key))
            candidates.append(Candidate(str(photos / f"u{u}.png"), str(photos / f"g{g}.png"), 0.9 - 0.1 * g, pid,
                                        f"ind-{g}"))
            outcomes[pid] = PairOutcome(LAYER, irm, uri, key)
    write_table(out, "pairs", pairs, MODEL, "run-1", date="2024-05-06")
    ranked = [_complete("candidates", row) for row in candidate_rows(rank_candidates(candidates, outcomes), "demo")]
    write_table(out, "candidates", ranked, MODEL, "run-1", date="2024-05-06")
    write_table(out, "errors", [_complete("errors", {"item": str(photos / "broken.jpg"), "stage": "load",
                                                     "error_type": "ImageError",
                                                     "message": "cannot identify image <broken>"})],
                MODEL, "run-1", date="2024-05-06")
    explained = [_pair_row(f"e{g}", str(photos / "u0.png"), str(photos / f"g{g}.png"), 0.5 + 0.1 * g, 0.5,
                           None, f"ekey-{g}") for g in range(2)]
    write_table(out, "pairs", explained, MODEL, "run-2", date="2024-05-07")
    return out


def test_site_structure_links_and_thumbnails(tmp_path):
    out = write_output(tmp_path)
    result = build_report(out, page_size=2, public_url="https://reviews.example/night")
    assert result.nights == 2
    assert result.public_index_url == "https://reviews.example/night/report/index.html"
    root = Path(out)
    night = root / "report" / "nights" / f"2024-05-06_{MODEL}"
    assert (night / "index.html").exists() and (night / "page-2.html").exists()  # 3 uploads, 2 a page

    index = parse_page(root / "report" / "index.html")
    text = " ".join(index.text)
    assert "2024-05-06" in text and "2024-05-07" in text and "demo" in text
    first, second = parse_page(night / "index.html"), parse_page(night / "page-2.html")
    assert [len(cards) for cards in first.uploads + second.uploads] == [3, 3, 3]  # top-k per upload
    assert all(cards == [0, 1, 2] for cards in first.uploads)  # ranked order
    page_text = " ".join(first.text)
    assert "cannot identify image <broken>" in page_text  # the night's errors with their messages
    # re-rank: g2 0.5 * 0.7 + 0.5 * 0.8 = 0.750, g1 0.5 * 0.8 + 0.5 * 0.5 = 0.650, g0 0.550
    assert "ind-1" in page_text and "0.750" in page_text and "0.650" in page_text
    no_irm = "<dt>IRM</dt><dd>n/a</dd>"
    assert no_irm not in (night / "index.html").read_text()
    assert no_irm in (night / "page-2.html").read_text()  # upload 2's candidate without IRM

    for page in site_pages(root):
        parsed = parse_page(page)
        assert not parsed.external, f"{page}: external resources {parsed.external}"
        for link in parsed.links:
            target = resolve(page, link)
            assert target is None or target.exists(), f"{page}: broken link {link}"
        if page.name.startswith("pair-"):
            continue  # a pair's own page shows the full-size picture (checked below)
        for source in parsed.sources:
            target = resolve(page, source)
            assert target.exists() and "/report/thumbs/" in str(target), source
            with Image.open(target) as image:  # a small derived image, never the full PNG
                assert image.format == "JPEG" and max(image.size) <= 480
    # each PAIR-X preview links to its pair's page, which shows the full PNG
    pair_pages = [resolve(night / "index.html", link) for link in first.links if "/pair-" in link or
                  link.startswith("pair-")]
    assert len(set(pair_pages)) == 6 and all(p.exists() for p in pair_pages)
    assert len(list(night.glob("pair-*.html"))) == 9

    explain_day = parse_page(root / "report" / "nights" / f"2024-05-07_{MODEL}" / "index.html")
    assert explain_day.uploads == [[0, 1]]  # pairs by similarity, no candidates table that day

    again = build_report(out, date="2024-05-07", page_size=2)
    assert again.nights == 1 and again.thumbs_written == 0  # thumbnails reused


@pytest.mark.integration
def test_site_on_s3(s3_bucket, tmp_path):
    """Tables, pictures and the site itself on a real S3 API (moto server)."""
    import boto3

    from infra.report import build_report

    out = f"s3://{s3_bucket}/out"
    local = write_output(tmp_path)
    client = boto3.client("s3")
    for path in Path(local).rglob("*"):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"out/{path.relative_to(local)}", Body=path.read_bytes())
    result = build_report(out, "2024-05-06")
    assert result.index_url == f"{out}/report/index.html"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/report/")["Contents"]}
    assert f"out/report/nights/2024-05-06_{MODEL}/index.html" in keys
    thumbs = [k for k in keys if k.startswith("out/report/thumbs/")]
    assert len(thumbs) == 6 * 2 + 9  # 6 photos (small + enlarged), 9 picture previews
    page = client.get_object(Bucket=s3_bucket, Key=f"out/report/nights/2024-05-06_{MODEL}/index.html")["Body"].read()
    assert page.count(b"<article class='card") == 9 and b"s3://" not in page  # relative links only


def _pair_page(night_dir: Path, upload: int, rank: int) -> tuple[PageParser, str]:
    page = night_dir / f"pair-{upload}-{rank}.html"
    return parse_page(page), page.read_text()


def test_pair_pages_picture_names_metrics_and_navigation(tmp_path):
    out = write_output(tmp_path)
    build_report(out, page_size=2)
    night = Path(out) / "report" / "nights" / f"2024-05-06_{MODEL}"

    first, text = _pair_page(night, 1, 1)
    words = " ".join(first.text)
    # the full-resolution PAIR-X picture, not a thumbnail
    pictures = [resolve(night / "pair-1-1.html", s) for s in first.sources if s.endswith(".png")]
    assert len(pictures) == 1 and "/viz/" in str(pictures[0])
    with Image.open(pictures[0]) as image:
        assert image.size == (1200, 640)
    # names and metrics: upload u0 against g2 (ind-2): re-rank 0.5 * 0.7 + 0.5 * 0.8 = 0.750
    assert "u0.png" in words and "ind-2" in words and "g2.png" in words
    assert "0.750" in words and "0.700" in words and "0.800" in words and LAYER in words
    # hooks for decision controls
    assert "id='pair'" in text and f"data-query='{tmp_path / 'photos' / 'u0.png'}'" in text
    assert "data-run='run-1'" in text and f"data-gallery='{tmp_path / 'photos' / 'g2.png'}'" in text

    def keyed(html: str) -> dict[str, str]:
        found = re.findall(r"<a href='([^']+)' data-key='(\w)'", html)
        return {key: link.removeprefix(f"../../../report/nights/{night.name}/") for link, key in found}

    first_keys = keyed(text)
    assert "p" not in first_keys  # the night's first pair has no previous one
    assert first_keys["n"] == "pair-1-2.html" and first_keys["j"] == "pair-2-1.html"
    assert first_keys["b"] == "index.html#u1"
    last_keys = keyed(_pair_page(night, 3, 3)[1])
    assert "n" not in last_keys and "j" not in last_keys
    assert last_keys["p"] == "pair-3-2.html" and last_keys["k"] == "pair-2-1.html"
    assert last_keys["b"] == "page-2.html#u3"  # upload 3 is on the night's second page
    assert "<link rel='prev' href='../../../report/nights/" in _pair_page(night, 3, 3)[1]
    # night pages: upload blocks with stable hooks
    night_text = (night / "index.html").read_text()
    assert f"id='u1' data-query='{tmp_path / 'photos' / 'u0.png'}' data-run='run-1'" in night_text
    # the explain-only day has pair pages too
    explain_day = Path(out) / "report" / "nights" / f"2024-05-07_{MODEL}"
    assert sorted(p.name for p in explain_day.glob("pair-*.html")) == ["pair-1-1.html", "pair-1-2.html"]


def _scored_night(root: Path, scores: list[float], *, spec: str, model: str = MODEL,
                  random_weights: bool | None = None, uploads: list[str] | None = None) -> str:
    """One upload (or ``uploads``) with candidates of these re-rank scores, a runs row when given."""
    out = str(root / "out")
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    uploads = uploads or [str(photos / "u.png")]
    Image.new("RGB", (32, 32), "red").save(photos / "u.png")
    candidates = []
    for query in uploads:
        for rank, score in enumerate(scores):
            candidates.append(_complete("candidates", {
                "query": query, "rank": rank, "gallery_image": str(photos / f"g{rank}.png"),
                "individual": f"ind-{rank}", "similarity": score, "irm": score, "rerank_score": score,
                "pair_id": f"p{rank}", "layer": LAYER, "model_spec": spec, "explained": True}))
    write_table(out, "candidates", candidates, model, "run-1", date="2024-05-06")
    if random_weights is not None:
        write_table(out, "runs", [_complete("runs", {"flow": "nightly", "random_weights": random_weights,
                                                     "model_spec": spec})], model, "run-1", date="2024-05-06")
    return out


def test_near_ties_are_flagged(tmp_path):
    out = _scored_night(tmp_path, [0.450, 0.447, 0.300, 0.2901], spec="miewid?weights=/w.safetensors",
                        random_weights=False)
    build_report(out)
    night = Path(out) / "report" / "nights" / f"2024-05-06_{MODEL}"
    text = (night / "index.html").read_text()
    cards = re.findall(r"<article class='([^']+)' data-rank='(\d)'", text)
    assert cards == [("card top near-tie", "0"), ("card near-tie", "1"), ("card near-tie", "2"),
                     ("card near-tie", "3")]
    assert "near tie with #2" in text and "near tie with #1" in text and "near tie with #4" in text
    assert "near tie with #3" in text  # 0.300 / 0.2901
    assert "near tie with #2" in (night / "pair-1-1.html").read_text()
    assert "class='banner" not in text

    apart = _scored_night(tmp_path / "apart", [0.450, 0.430], spec="miewid?weights=/w.safetensors")
    build_report(apart)
    text = (Path(apart) / "report" / "nights" / f"2024-05-06_{MODEL}" / "index.html").read_text()
    assert "card near-tie" not in text and "near tie with" not in text


def test_random_weights_banner_on_every_page(tmp_path):
    out = _scored_night(tmp_path, [0.5, 0.3], spec="timm:resnet18", random_weights=True)
    build_report(out)
    pages = site_pages(Path(out))
    assert len(pages) == 4  # index, night, 2 pairs
    for page in pages:
        assert "class='banner random-weights'" in page.read_text(), page

    # without a runs row, the recorded spec decides (a timm architecture without weights)
    bare = _scored_night(tmp_path / "bare", [0.5], spec="timm:resnet18")
    build_report(bare)
    assert all("banner random-weights" in p.read_text() for p in site_pages(Path(bare)))
    trained = _scored_night(tmp_path / "trained", [0.5], spec="miewid?weights=/w.safetensors", random_weights=False)
    build_report(trained)
    assert not any("class='banner" in p.read_text() for p in site_pages(Path(trained)))


def test_demo_model_outside_the_demo_is_labelled(tmp_path):
    out = _scored_night(tmp_path / "real", [0.5, 0.3], spec="demo", random_weights=False)
    build_report(out)
    for page in site_pages(Path(out)):
        assert "class='banner demo'" in page.read_text() and "synthetic animals" in page.read_text(), page

    # the demo's own night: its uploads are listed in ground_truth.json next to the output root
    demo = tmp_path / "demo"
    upload = str(demo / "data" / "uploads" / "a-night.png")
    out = _scored_night(demo, [0.5, 0.3], spec="demo", random_weights=False, uploads=[upload])
    Path(out).rename(demo / "results")
    (demo / "ground_truth.json").write_text(json.dumps({upload: {"individual": "a"}}))
    build_report(str(demo / "results"))
    assert not any("class='banner" in p.read_text() for p in site_pages(demo / "results"))


def test_previews_leave_out_the_text_strips(tmp_path):
    """Previews are the picture's panels; names and metrics are page text of at least 12 px."""
    from pairx_core.render import PANELS_INFO_KEY, render
    from pairx_core.results import LayerExplanation, matches_frame

    frame = matches_frame({"rank": [0], "row_0": [0], "col_0": [0], "row_1": [0], "col_1": [0], "x_0": [8.0],
                           "y_0": [8.0], "x_1": [9.0], "y_1": [9.0], "distance": [1.0], "relevance": [1.0]})
    layer = LayerExplanation(LAYER, np.ones((4, 4)), np.ones((4, 4)), frame, np.zeros((0, 32, 32)),
                             np.zeros((0, 32, 32)), (4, 4, 4), (32, 32))
    photo = np.full((512, 512, 3), 90, np.uint8)
    picture = render(layer, photo, photo, similarity=0.8, irm=0.5, label_0="upload u0", label_1="candidate ind-0")
    top, bottom = (int(v) for v in picture.info[PANELS_INFO_KEY].split(","))
    assert top > 0 and bottom == top + 2 * 512 and picture.height > bottom  # label and caption strips

    out = write_output(tmp_path)
    uri = viz_uri(out, MODEL, "p00", LAYER)
    write_png(None, uri, picture)
    preview = ThumbWriter(out).picture(relative_to_out(out, uri), "key-00")
    with Image.open(Path(out) / preview) as image:  # 1024 x 1024 panels at 480 px wide: no text strip left
        assert image.size == (480, 480)
    build_report(out, date="2024-05-06")
    page = Path(out) / "report" / "nights" / f"2024-05-06_{MODEL}" / "index.html"
    css = re.search(r"<style>(.*?)</style>", page.read_text(), re.S).group(1)
    sizes = [int(v) for v in re.findall(r"font-size:(\d+)px", css)]
    assert min(sizes) >= 12 and "small,kbd,code{font-size:12px}" in css


def test_reprocess_night_and_plan_name_models_and_individuals(tmp_path):
    """A re-explained night (pairs, no candidates) names individuals and the model it re-explains."""
    from flows.config import ReprocessConfig
    from flows.preflight import check_inputs
    from infra.tables import read_table

    out = write_output(tmp_path)
    config = ReprocessConfig(out=out, model="timm:resnet18?weights=/w.safetensors", layers=[LAYER])
    line = check_inputs("reprocess", config).describe(config)
    assert line.startswith(f"reprocess: 11 recorded pairs, 1 model(s), 3 individual(s) from {MODEL} (11);"), line

    redone = read_table(out, "pairs").drop(columns=["date", "created_at", "model_id", "run_id"])
    redone = redone[redone.pair_id.str.startswith("p")].assign(model_spec="timm:resnet18?weights=/w.safetensors")
    write_table(out, "pairs", redone, "m-new", "run-3", date="2024-05-08")
    build_report(out, date="2024-05-08")
    page = (Path(out) / "report" / "nights" / "2024-05-08_m-new" / "index.html").read_text()
    words = " ".join(parse_page(Path(out) / "report" / "nights" / "2024-05-08_m-new" / "index.html").text)
    assert "#1 ind-0" in words and "ind-1" in words and "ind-2" in words  # individuals, not file names
    assert f"Re-explains pairs first explained by <code>demo</code> <small>({MODEL})</small>" in page
