"""A real ``nightly`` run's output: DuckDB views (join counts) and the review site in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from report_helpers import parse_page, resolve, site_pages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"
TOP_K = 2


@pytest.fixture(scope="module")
def night(prefect_harness, tmp_path_factory):
    """Output root of one nightly run: 3 uploads (+1 broken) against 3 gallery individuals, top-2."""
    from flows.config import NightlyConfig
    from flows.nightly import nightly
    from pairx_core.synthetic import make_individuals, render_photo

    root = tmp_path_factory.mktemp("night")
    for ind in make_individuals(3, seed=5):
        (root / "gallery" / ind.id).mkdir(parents=True)
        render_photo(ind, seed=0, size=(96, 64)).image.save(root / "gallery" / ind.id / "a.png")
        (root / "uploads").mkdir(exist_ok=True)
        render_photo(ind, seed=1, size=(96, 64)).image.save(root / "uploads" / f"{ind.id}.png")
    (root / "uploads" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = root / "out"
    config = NightlyConfig(uploads=str(root / "uploads"), gallery=str(root / "gallery"), out=str(out), model=MODEL,
                           layers=[LAYER], top_k=TOP_K, rerank_k=0, k_colors=2, k_lines=5, batch_pairs=3, workers=0,
                           allow_random_weights=True)
    from flows.common import ItemsFailedError

    with pytest.raises(ItemsFailedError) as raised:  # the broken upload fails the run (its pairs are done)
        nightly(config)  # tasks in process (workers=0)
    summary = raised.value.summary
    assert summary["done"] == 3 * TOP_K and summary["failed"] == 1
    return out


def test_views_join_counts_on_a_real_night(night, tmp_path):
    import duckdb

    from infra.tables import read_table, write_table
    from infra.views import create_views

    out = str(shutil.copytree(night, tmp_path / "out"))  # rows are added below: leave the shared night as is
    pairs, matches = read_table(out, "pairs"), read_table(out, "matches")
    candidates, images = read_table(out, "candidates"), read_table(out, "images")
    # the candidates rows carry their explanation's keys and a readable model spec
    assert candidates[["pair_id", "layer", "viz_uri", "output_key"]].notna().all().all()
    assert set(candidates.output_key) <= set(pairs.output_key) and set(candidates.layer) == {LAYER}
    assert set(candidates.model_spec) == {MODEL} and set(pairs.model_spec) == {MODEL}
    assert candidates.viz_uri.tolist() == [pairs.set_index("output_key").viz_uri[k] for k in candidates.output_key]
    # one images row per content (6 photos decoded; the broken upload never is), with its run
    assert len(images) == images.content_hash.nunique() == 6 and images.run_id.notna().all()

    # a second model explained the same pairs: pair_id alone no longer identifies a row
    other = pairs.drop(columns=["date", "created_at"]).assign(model_id="other-model",
                                                             output_key=lambda f: f.output_key + "-other")
    write_table(out, "pairs", other, "other-model", "run-other")
    write_table(out, "matches", matches.drop(columns=["date"]).assign(
        model_id="other-model", output_key=lambda f: f.output_key + "-other"), "other-model", "run-other")
    write_table(out, "images", images.drop(columns=["date"]).assign(model_id="other-model"), "other-model", "run-o")

    con = create_views(duckdb.connect(), out)

    def one(sql: str):
        return con.sql(sql).fetchall()[0]

    n_matches = 2 * len(matches)
    assert one("SELECT count(*) FROM pair_matches")[0] == n_matches  # one row per match
    naive = one("SELECT count(*) FROM matches JOIN pairs USING (pair_id, layer)")[0]
    assert naive == 2 * n_matches  # what a join on pair_id double-counts
    review = one("SELECT count(*), count(n_matches), count(DISTINCT query) FROM candidate_review")
    assert review == (len(candidates), len(candidates), 3)  # one row per candidate, each joined to its pair
    assert one("SELECT count(*) FROM images")[0] == 12  # per (content, model)
    nights = con.sql("SELECT model_id, model_spec, uploads, pairs, candidates, failures FROM nights "
                     "ORDER BY model_id").fetchall()
    mine = [n for n in nights if n[0] != "other-model"]
    assert mine == [(pairs.model_id.iloc[0], MODEL, 3, 3 * TOP_K, 3 * TOP_K, 1)]
    assert one("SELECT count(*) FROM runs")[0] == 1


CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var width = document.documentElement.clientWidth;
  var result = {
    width: width,
    images: images.length,
    broken: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                  .map(function (i) { return i.getAttribute('src'); }),
    cards: Array.prototype.map.call(document.querySelectorAll('section.upload'),
                                    function (s) { return s.querySelectorAll('article.card').length; }),
    outside: Array.prototype.filter.call(document.querySelectorAll('article.card'),
                                         function (c) { return c.getBoundingClientRect().right > width + 0.5; }).length,
    smallest_text: Math.min.apply(null, Array.prototype.filter.call(document.querySelectorAll('main *'), function (e) {
        return Array.prototype.some.call(e.childNodes,
                                         function (n) { return n.nodeType === 3 && n.textContent.trim(); });
      }).map(function (e) { return parseFloat(getComputedStyle(e).fontSize); })),
    picture_width: Array.prototype.map.call(document.querySelectorAll('figure.picture img'),
                                            function (i) { return i.naturalWidth; }),
    text: (document.querySelector('main') || document.body).innerText
  };
  var pre = document.createElement('pre');
  pre.id = 'pairx-check';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/setup.sh installs it in CI)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return binary


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--window-size=1366,2000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_review_site_of_a_real_night_in_chromium(night, tmp_path):
    from infra.report import build_report

    binary = _chromium()
    result = build_report(str(night))
    index = Path(result.index_url)
    assert index == night / "report" / "index.html" and index.exists()
    pages = site_pages(night)
    (night_page,) = [p for p in pages if p.parent.parent.name == "nights" and p.name == "index.html"]
    pair_pages = sorted(night_page.parent.glob("pair-*.html"))
    assert len(pair_pages) == 3 * TOP_K  # one page per explained pair

    # browser-free: every link and image resolves, top-k candidates per upload
    for page in pages:
        parsed = parse_page(page)
        for reference in parsed.links + parsed.sources:
            target = resolve(page, reference)
            assert target is None or target.exists(), f"{page}: broken {reference}"
    parsed = parse_page(night_page)
    assert [len(cards) for cards in parsed.uploads] == [TOP_K] * 3
    assert "broken.jpg" in " ".join(parsed.text)  # the night's error is listed

    # in the browser: a copy of the page next to it (same relative links) with a check script;
    # lazy loading is switched off in the copy so that every image is fetched before `load`
    checked = night_page.with_name("browser-check.html")
    text = night_page.read_text().replace("loading='lazy'", "loading='eager'")
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        dumped = _run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=20000", "--dump-dom",
                               checked.as_uri())
        match = re.search(r'<pre id="pairx-check">(.*?)</pre>', dumped.stdout, re.S)
        assert match, f"no check result; chromium said:\n{dumped.stderr[-2000:]}"
        report = json.loads(html.unescape(match.group(1)))
        assert report["width"] == 1366
        assert report["images"] == 3 + 3 * TOP_K * 2 and report["broken"] == []  # uploads, candidate photos, pictures
        assert report["cards"] == [TOP_K] * 3 and report["outside"] == 0  # top-k side by side within 1366 px
        screenshot = tmp_path / "night.png"
        shot = _run_chromium(binary, tmp_path / "profile-shot", "--virtual-time-budget=20000",
                             f"--screenshot={screenshot}", checked.as_uri())
        assert screenshot.exists(), shot.stderr[-2000:]
        with Image.open(screenshot) as image:
            assert image.size == (1366, 2000)
        print(f"review page screenshot: {screenshot}")
        assert report["smallest_text"] >= 12  # captions and names under the previews are readable
        index_dump = _run_chromium(binary, tmp_path / "profile-index", "--dump-dom", index.as_uri())
        assert night_page.parent.name in index_dump.stdout  # the index links to the night

        # a pair's own page: full-resolution picture, names, metrics, links to its neighbours
        pair_page = night_page.parent / "pair-1-1.html"
        checked_pair = pair_page.with_name("browser-check-pair.html")
        checked_pair.write_text(pair_page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
        pair = _browser_check(binary, tmp_path / "profile-pair", checked_pair)
        assert pair["broken"] == [] and pair["images"] == 3  # upload, candidate, PAIR-X picture
        (full_width,) = pair["picture_width"]
        with Image.open(resolve(pair_page, [s for s in parse_page(pair_page).sources if s.endswith(".png")][0])) as png:
            assert full_width == png.width  # the PNG itself, not a preview
        for word in ("similarity", "IRM", "re-rank", "candidate individual", "next pair", "next upload", LAYER):
            assert word in pair["text"], word
        assert pair["smallest_text"] >= 12
        pair_screenshot = tmp_path / "pair.png"
        _run_chromium(binary, tmp_path / "profile-pair-shot", "--virtual-time-budget=20000",
                      f"--screenshot={pair_screenshot}", checked_pair.as_uri())
        print(f"pair page screenshot: {pair_screenshot}")
    finally:
        checked.unlink()
        night_page.with_name("browser-check-pair.html").unlink(missing_ok=True)


def _browser_check(binary: str, profile: Path, page: Path) -> dict:
    dumped = _run_chromium(binary, profile, "--virtual-time-budget=20000", "--dump-dom", page.as_uri())
    match = re.search(r'<pre id="pairx-check">(.*?)</pre>', dumped.stdout, re.S)
    assert match, f"no check result; chromium said:\n{dumped.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))
