"""The review site (infra.report) on tables written directly: structure, links, thumbnails, pages."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from infra.report import build_report
from infra.tables import TABLE_SCHEMAS, write_table
from infra.viz import viz_uri, write_png
from pairx_core.retrieval import Candidate, PairOutcome, rank_candidates
from report_helpers import parse_page, resolve, site_pages

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
    ranked = [_complete("candidates", row) for row in rank_candidates(candidates, outcomes, model_spec="demo")]
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
        for source in parsed.sources:
            target = resolve(page, source)
            assert target.exists() and "/report/thumbs/" in str(target), source
            with Image.open(target) as image:  # a small derived image, never the full PNG
                assert image.format == "JPEG" and max(image.size) <= 480
    # each PAIR-X preview links to its full PNG
    full = [resolve(night / "index.html", link) for link in first.links if link.endswith(".png")]
    assert len(full) == 6 and all(p.exists() and "/viz/" in str(p) for p in full)

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
