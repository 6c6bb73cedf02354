"""HTML of the review site: plain pages, inline CSS, no external resources, relative links."""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..storage import OutputLayout
from .data import Card, Night, Photo, Upload, near_ties
from .figures import ReviewFigures

REPORT_DIR = OutputLayout.REPORT


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def href(path_from_out: str, depth: int) -> str:
    """Relative link from a page ``depth`` folders below OUT to ``path_from_out``."""
    return esc("../" * depth + urllib.parse.quote(path_from_out, safe="/=-_.~"))


def night_page(night: Night, page: int) -> str:
    """Path (relative to OUT) of page ``page`` (1-based) of a night."""
    name = "index.html" if page == 1 else f"page-{page}.html"
    return f"{REPORT_DIR}/nights/{night.slug}/{name}"


def pair_page(night: Night, number: int, card: Card) -> str:
    """Path (relative to OUT) of the page of upload ``number``'s (1-based) candidate ``card``."""
    return f"{REPORT_DIR}/nights/{night.slug}/pair-{number}-{card.rank + 1}.html"


NIGHT_DEPTH = 3  # report/nights/<slug>/ (night pages and pair pages)
INDEX_DEPTH = 1  # report/

CSS = """
:root{color-scheme:light}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 16px 32px;color:#111;background:#fff}
h1{font-size:22px;margin:14px 0 6px} h2{font-size:18px;margin:18px 0 6px}
a{color:#0645ad} a:focus-visible,section:focus-visible{outline:3px solid #e08a00;outline-offset:2px}
.skip{position:absolute;left:-999px} .skip:focus{left:16px;top:8px;background:#fff;padding:4px 8px;z-index:9}
.legend{color:#333;max-width:1100px;margin:4px 0 8px}
table.list{border-collapse:collapse;margin:8px 0}
table.list th,table.list td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
table.list td.num{text-align:right}
nav.pages{margin:10px 0}
nav.pages a,nav.pages span{display:inline-block;padding:2px 8px;margin-right:4px;
  border:1px solid #ccc;border-radius:3px}
nav.pages [aria-current]{background:#222;color:#fff}
section.upload{display:flex;gap:10px;border-top:1px solid #ccc;padding:10px 0}
.query{flex:0 0 170px;min-width:0;overflow-wrap:anywhere;font-size:13px}
.query img{display:block;max-width:170px;max-height:220px;width:auto;height:auto}
.cands{flex:1 1 auto;min-width:0;display:grid;grid-template-columns:repeat(var(--k),minmax(0,1fr));gap:8px}
.card{border:1px solid #d6d6d6;border-radius:4px;padding:6px;min-width:0;font-size:13px}
.card.top{border-color:#3a7d2c}
.card .head{display:flex;gap:8px;align-items:flex-start}
.card .head img{display:block;max-width:110px;max-height:110px;width:auto;height:auto}
.card .who{font-weight:600;font-size:14px;overflow-wrap:anywhere}
.card dl{display:grid;grid-template-columns:auto auto;gap:0 8px;margin:4px 0}
.card dt{color:#555} .card dd{margin:0;font-variant-numeric:tabular-nums}
.card .pic{display:block;margin-top:6px} .card .pic img{display:block;width:100%;height:auto}
.missing{color:#a00}
small,kbd,code{font-size:12px}
.banner{border:2px solid #b00;background:#fff0f0;color:#600;padding:8px 12px;margin:10px 0;font-weight:600;
max-width:1100px}
.banner.demo{border-color:#a66b00;background:#fff7e6;color:#5a3b00}
.tie,.tag{display:inline-block;background:#fff3c4;border:1px solid #c9a400;border-radius:3px;padding:0 5px;
font-size:12px;color:#5a4600}
.card.near-tie{border-color:#c9a400}
.card .caption{font-size:13px;color:#333;margin:2px 0 0}
nav.pair{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0}
nav.pair a,nav.pair span{padding:2px 8px;border:1px solid #ccc;border-radius:3px}
nav.pair span{color:#888}
.pair-photos{display:flex;gap:16px;flex-wrap:wrap;margin:10px 0} .pair-photos figure{margin:0}
.pair-photos img{display:block;max-width:420px;max-height:420px;width:auto;height:auto}
figure.picture{margin:10px 0;overflow-x:auto} figure.picture img{display:block;max-width:none;height:auto}
figcaption{font-size:14px;color:#333}
table.metrics th{text-align:left;font-weight:600;padding-right:16px}
table.errors td.msg{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;max-width:800px}
"""

KEYS_SCRIPT = """
<script>
document.addEventListener('keydown', function (event) {
  if (event.altKey || event.ctrlKey || event.metaKey || /INPUT|TEXTAREA|SELECT/.test(event.target.tagName)) return;
  var keyed = /^[a-zA-Z]$|^Escape$/.test(event.key) && document.querySelector('a[data-key="' + event.key + '"]');
  if (keyed) { location.href = keyed.href; return; }
  var rel = {n: 'next', p: 'prev'}[event.key];
  if (rel) { var link = document.querySelector('link[rel=' + rel + ']'); if (link) location.href = link.href; return; }
  if (event.key === 'j' || event.key === 'k') {
    var items = Array.prototype.slice.call(document.querySelectorAll('section.upload'));
    var focused = document.activeElement.closest ? document.activeElement.closest('section.upload') : null;
    var current = items.indexOf(focused);
    var next = items[Math.max(0, Math.min(items.length - 1, current + (event.key === 'j' ? 1 : -1)))];
    if (next) { next.focus(); next.scrollIntoView({block: 'start'}); }
  }
});
</script>
"""


RANDOM_WEIGHTS_BANNER = ("Random weights: {which} ran without trained weights. Its similarities, IRM, "
                         "rankings and PAIR-X pictures look normal but mean nothing.")
DEMO_BANNER = ("Demo model: <code>demo</code> was trained only on the synthetic animals of <code>pairx demo</code>. "
               "On other photos its rankings and pictures mean nothing; use a real model "
               "(for example <code>miewid?weights=...</code>).")


def banners_html(nights: Sequence[Night]) -> str:
    """Warnings that hold for every page of these nights: random weights, the demo model elsewhere."""
    parts = []
    random = [n for n in nights if n.random_weights]
    if random:
        which = "this model" if len(nights) == 1 else "model " + ", ".join(sorted({n.model_id for n in random}))
        parts.append(f"<div class='banner random-weights' role='alert'>{esc(RANDOM_WEIGHTS_BANNER.format(which=which))}"
                     "</div>")
    if any(n.demo_elsewhere for n in nights):
        parts.append(f"<div class='banner demo' role='note'>{DEMO_BANNER}</div>")
    return "".join(parts)


def _document(title: str, body: Sequence[str], head_links: Sequence[str] = (), banners: str = "") -> str:
    return "\n".join([
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(title)}</title>", *head_links, f"<style>{CSS}</style></head><body>",
        "<a class='skip' href='#main'>Skip to content</a>", banners, *body, KEYS_SCRIPT, "</body></html>",
    ])


def _model_label(night: Night) -> str:
    if night.model_spec:
        return f"<code>{esc(night.model_spec)}</code> <small>({esc(night.model_id)})</small>"
    return f"<code>{esc(night.model_id)}</code>"


def _model_tags(night: Night) -> str:
    tags = (["random weights"] if night.random_weights else []) + (["demo model"] if night.demo_elsewhere else [])
    return "".join(f" <span class='tag'>{esc(tag)}</span>" for tag in tags)


def _duration(seconds: float | None) -> str:
    """Seconds as a short human duration (``n/a`` for none)."""
    if seconds is None:
        return "n/a"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _count(value: object) -> str:
    return "0" if value is None else str(int(value))


def _progress_cells(night: Night, figures: ReviewFigures) -> str:
    row = figures.progress_of(night.date, night.model_id)
    if row is None:
        return "<td class='num'>-</td><td class='num'>-</td><td class='num'>-</td>"
    return (f"<td class='num'>{_count(row['decided'])}</td><td class='num'>{_count(row['pending'])}</td>"
            f"<td class='num'>{_duration(row['median_s_to_decision'])}</td>")


def _figure_table(table_id: str, headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A ``list`` table: ``headers`` as column headings, one row per entry of ``cells`` (HTML)."""
    head = "".join(f"<th scope='col'>{h}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(row) + "</tr>" for row in cells)
    return f"<table class='list' id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _num(text: str) -> str:
    return f"<td class='num'>{text}</td>"


def _precision_html(figures: ReviewFigures) -> str:
    if figures.precision.empty:
        return "<p>No <code>match</code> decisions yet.</p>"
    cells = [(f"<td>{esc(r.date if r.date is not None else 'n/a')}</td>", f"<td><code>{esc(r.model_id)}</code></td>",
              f"<td><code>{esc(r.night_run_id)}</code></td>", _num(_count(r.matches)),
              _num(_count(r.matches_among_candidates)), _num(_share(r.retrieval_top1_share)),
              _num(_share(r.reranked_top1_share)))
             for r in figures.precision.itertuples(index=False)]
    return _figure_table("model-precision", ("date (UTC)", "model", "night run", "matches", "among candidates",
                                             "retrieval rank 0", "re-ranked rank 0"), cells)


def _calibration_html(figures: ReviewFigures) -> str:
    if figures.calibration.empty:
        return "<p>No upload accepted one of its candidates yet.</p>"
    cells = [(f"<td><code>{esc(r.model_id)}</code></td>", _num(_count(r.uploads)), _num(_count(r.candidates)),
              _num(_count(r.comparisons)), _num(fmt(r.auc_rerank_score)), _num(fmt(r.auc_similarity)))
             for r in figures.calibration.itertuples(index=False)]
    return _figure_table("plausibility-calibration", ("model", "uploads", "candidates", "comparisons",
                                                      "AUC re-rank score", "AUC similarity alone"), cells)


def _figures_html(figures: ReviewFigures) -> list[str]:
    if figures.problem:
        return [f"<h2 id='review-figures'>Reviewer decisions</h2><p class='missing'>Figures unavailable: "
                f"{esc(figures.problem)}</p>"]
    return [
        "<h2 id='model-precision-heading'>Model precision</h2>",
        "<p class='legend'>Of the <code>match</code> decisions on each night run's uploads, the share whose "
        "accepted candidate was first by similarity (retrieval rank 0) and first after PAIR-X re-ranking "
        "(re-ranked rank 0). A match on an individual outside the candidates counts as neither. "
        "View <code>model_precision</code>.</p>", _precision_html(figures),
        "<h2 id='plausibility-calibration-heading'>Plausibility calibration</h2>",
        "<p class='legend'>Over uploads whose latest decision accepted one of their candidates: how often "
        "the accepted candidate scores above another candidate of the same upload (ROC AUC; 0.5 is chance, "
        "1.0 always right), by re-rank score and by similarity alone. View "
        "<code>plausibility_calibration</code>.</p>", _calibration_html(figures)]


def index_html(nights: Sequence[Night], figures: ReviewFigures | None = None) -> str:
    """The list of nights (date, model, uploads, pairs, failures, link to the night's first page)
    and, with ``figures``, the review progress of each night and the model's measured precision."""
    figures = figures if figures is not None else ReviewFigures()
    rows = []
    for night in nights:
        link = href(night_page(night, 1), INDEX_DEPTH)
        rows.append(
            f"<tr data-date='{esc(night.date)}' data-model='{esc(night.model_id)}'>"
            f"<td><a href='{link}'>{esc(night.date)}</a></td><td>{_model_label(night)}{_model_tags(night)}</td>"
            f"<td class='num'>{len(night.uploads)}</td><td class='num'>{night.n_pairs}</td>"
            f"<td class='num'>{len(night.errors)}</td>{_progress_cells(night, figures)}</tr>")
    body = ["<main id='main'><h1>PAIR-X review: nights</h1>",
            "<p class='legend'>Each night lists its uploads with their ranked gallery candidates and PAIR-X "
            "pictures. Decided: latest decision <code>match</code>, <code>new_individual</code> or "
            "<code>no_match</code>; pending: no decision or <code>unsure</code> (view <code>review_progress</code>; "
            "as of this page's writing). Keyboard: Tab moves between links, Enter opens.</p>"]
    if rows:
        body += ["<table class='list' id='nights'><caption class='skip'>Nights</caption><thead><tr>"
                 "<th scope='col'>date (UTC)</th><th scope='col'>model</th><th scope='col'>uploads</th>"
                 "<th scope='col'>pairs</th><th scope='col'>failures</th><th scope='col'>decided</th>"
                 "<th scope='col'>pending</th><th scope='col'>median time to decision</th></tr></thead><tbody>",
                 *rows, "</tbody></table>"]
        body += _figures_html(figures)
    else:
        body.append("<p>No nights recorded yet.</p>")
    body.append("</main>")
    return _document("PAIR-X review", body, banners=banners_html(nights))


def _pager(night: Night, page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    parts = ["<nav class='pages' aria-label='pages of this night'>"]
    if page > 1:
        parts.append(f"<a href='{href(night_page(night, page - 1), NIGHT_DEPTH)}' rel='prev'>&lsaquo; previous</a>")
    for number in range(1, pages + 1):
        if number == page:
            parts.append(f"<span aria-current='page'>{number}</span>")
        else:
            parts.append(f"<a href='{href(night_page(night, number), NIGHT_DEPTH)}'>{number}</a>")
    if page < pages:
        parts.append(f"<a href='{href(night_page(night, page + 1), NIGHT_DEPTH)}' rel='next'>next &rsaquo;</a>")
    parts.append("</nav>")
    return "".join(parts)


def _img(thumb: tuple[str, str] | None, alt: str) -> str:
    if thumb is None:
        return f"<span class='missing'>{esc(alt)}: photo unavailable</span>"
    small, large = thumb
    return (f"<a href='{href(large, NIGHT_DEPTH)}' title='enlarge'><img src='{href(small, NIGHT_DEPTH)}' "
            f"alt='{esc(alt)}' loading='lazy'></a>")


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _metrics(card: Card, ranked: bool) -> list[tuple[str, str]]:
    metrics = [("similarity", fmt(card.similarity)), ("IRM", fmt(card.irm))]
    if ranked:
        metrics.append(("re-rank", fmt(card.rerank_score)))
    if card.n_matches is not None:
        metrics.append(("matches", str(card.n_matches)))
    return metrics


def _tie_badge(ties: list[int]) -> str:
    if not ties:
        return ""
    others = ", ".join(f"#{rank + 1}" for rank in ties)
    return f"<span class='tie' title='scores within 0.01: the order may not mean much'>near tie with {others}</span>"


def _card(card: Card, photo: tuple[str, str] | None, picture: tuple[str, str] | None, ranked: bool,
          page_link: str | None, ties: list[int]) -> str:
    name = _name(card.photo.uri)
    who = card.individual or name
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _metrics(card, ranked))
    target = page_link or (href(picture[1], NIGHT_DEPTH) if picture else None)
    if picture is None:
        pic = "<p class='missing'>no PAIR-X picture</p>"
    else:
        preview, _full = picture
        pic = (f"<a class='pic' href='{target}' title='this pair: full-size picture and metrics'>"
               f"<img src='{href(preview, NIGHT_DEPTH)}' alt='PAIR-X picture: upload against {esc(who)}' "
               f"loading='lazy'></a>")
    caption = (f"<p class='caption'>upload (left) &middot; {esc(who)} (right)"
               + (f" &middot; layer <code>{esc(card.layer)}</code>" if card.layer else "") + "</p>")
    more = f" <a href='{target}'>details</a>" if page_link else ""
    classes = "card" + (" top" if card.rank == 0 else "") + (" near-tie" if ties else "")
    return (f"<article class='{classes}' data-rank='{card.rank}' data-gallery='{esc(card.photo.uri)}'"
            f"{_data('pair', card.pair_id)}{_data('layer', card.layer)}>"
            f"<div class='head'>{_img(photo, f'candidate {who}')}<div>"
            f"<div class='who'>#{card.rank + 1} {esc(who)}</div>"
            f"<div><small>{esc(name)}</small></div><dl>{dl}</dl>{_tie_badge(ties)}{more}</div></div>{pic}{caption}"
            "</article>")


def _data(key: str, value: str | None) -> str:
    return "" if value is None else f" data-{key}='{esc(value)}'"


def _upload_attributes(night: Night, upload: Upload, number: int) -> str:
    """Stable hooks of an upload block: ``id``, ``data-query``, ``data-detection`` (a camera-trap
    detection's ``candidates.query_detection_id``), ``data-run``, ``data-model``, ``data-date``."""
    return (f"id='u{number}' data-query='{esc(upload.photo.uri)}'{_data('detection', upload.detection_id)}"
            f"{_data('run', upload.run_id)}"
            f" data-model='{esc(night.model_id)}' data-date='{esc(night.date)}'")


def _legend(night: Night) -> str:
    order = ("Candidates ranked by re-rank score = 0.5 &times; similarity + 0.5 &times; IRM (similarity alone "
             "where IRM is n/a: fewer than 5 matches or no relevance among them)." if night.ranked else
             "Pairs of each first image, by similarity.")
    source = ""
    if night.source_models:
        names = ", ".join(f"<code>{esc(spec)}</code> <small>({esc(mid)})</small>" if spec
                          else f"<code>{esc(mid)}</code>" for mid, spec in night.source_models.items())
        source = f" Re-explains pairs first explained by {names}."
    return (f"Model {_model_label(night)}.{source} {order} Neighbours whose scores differ by 0.01 or less are marked "
            "<span class='tie'>near tie</span>.")


def night_html(night: Night, page: int, pages: int, uploads: Sequence[Upload], first_index: int,
               photo_thumb: Callable, picture_thumb: Callable, errors_html: str) -> str:
    """One page of a night: its uploads ``uploads`` (the ``page``-th slice), errors on page 1."""
    k = max(1, night.top_k)
    title = f"{night.date}: PAIR-X review"
    body = [f"<p><a href='{href(REPORT_DIR + '/index.html', NIGHT_DEPTH)}'>&larr; all nights</a></p>",
            f"<main id='main'><h1>{esc(night.date)} &middot; {len(night.uploads)} uploads, {night.n_pairs} pairs, "
            f"{len(night.errors)} failures</h1>",
            f"<p class='legend'>{_legend(night)} PAIR-X picture: on top, the upload (left) and "
            "the candidate (right) under their relevance heatmaps, with the top matches as lines; below, the pixel "
            "relevance of the top matches, one colour each, over faded photos. Click a picture for the pair's own "
            "page (full-size picture, metrics, next/previous pair), a photo to enlarge it. "
            "Keys: <kbd>j</kbd>/<kbd>k</kbd> next/previous upload, <kbd>n</kbd>/<kbd>p</kbd> next/previous page.</p>",
            _pager(night, page, pages)]
    for offset, upload in enumerate(uploads):
        number = first_index + offset + 1
        ties = near_ties(upload.cards, night.ranked)
        cards = "".join(
            _card(c, photo_thumb(c.photo), picture_thumb(c), night.ranked,
                  href(pair_page(night, number, c), NIGHT_DEPTH) if c.pair_id else None, ties.get(c.rank, []))
            for c in upload.cards)
        body.append(
            f"<section class='upload' {_upload_attributes(night, upload, number)} tabindex='-1' "
            f"aria-label='upload {number}: {esc(upload.name)}'>"
            f"<div class='query'><div><strong>upload {number}</strong></div>"
            f"{_img(photo_thumb(upload.photo), f'upload {upload.name}')}"
            f"<div>{esc(upload.name)}</div>{_frame(upload, photo_thumb)}</div>"
            f"<div class='cands' style='--k:{k}'>{cards}</div></section>")
    if not night.uploads:
        body.append("<p>No uploads explained this night.</p>")
    body.append(_pager(night, page, pages))
    if page == 1:
        body.append(errors_html)
    body.append("</main>")
    links = []
    if page > 1:
        links.append(f"<link rel='prev' href='{href(night_page(night, page - 1), NIGHT_DEPTH)}'>")
    if page < pages:
        links.append(f"<link rel='next' href='{href(night_page(night, page + 1), NIGHT_DEPTH)}'>")
    return _document(title, body, links, banners_html([night]))


def _frame(upload: Upload, photo_thumb: Callable) -> str:
    """A detection's whole frame with its box drawn in (camera-trap nights), else nothing."""
    if upload.detection is None or upload.photo.box is None:
        return ""
    framed = Photo(upload.photo.uri, upload.photo.box, upload.photo.theta, framed=True)
    return f"<div class='frame'>{_img(photo_thumb(framed), f'frame of {upload.name}, its box drawn in')}</div>"


@dataclass(frozen=True)
class PairStop:
    """One explained pair in the order a reviewer walks a night: upload ``number`` (1-based), its card."""

    number: int
    upload: Upload
    card: Card
    #: night page (1-based) that shows the upload
    page: int


def pair_stops(night: Night, page_size: int) -> list[PairStop]:
    """Every card of the night that has an explanation (``pair_id``), uploads then ranks."""
    return [PairStop(index + 1, upload, card, index // page_size + 1)
            for index, upload in enumerate(night.uploads) for card in upload.cards if card.pair_id]


def _full_photo(thumb: tuple[str, str] | None, alt: str, caption: str) -> str:
    if thumb is None:
        return (f"<figure><span class='missing'>{esc(alt)}: photo unavailable</span>"
                f"<figcaption>{caption}</figcaption></figure>")
    return (f"<figure><a href='{href(thumb[1], NIGHT_DEPTH)}'><img src='{href(thumb[1], NIGHT_DEPTH)}' "
            f"alt='{esc(alt)}'></a><figcaption>{caption}</figcaption></figure>")


def _nav_link(target: str | None, label: str, key: str, rel: str | None = None) -> str:
    if target is None:
        return f"<span aria-disabled='true'>{label}</span>"
    rel_attr = f" rel='{rel}'" if rel else ""
    return f"<a href='{target}' data-key='{key}'{rel_attr}>{label} <kbd>{esc(key)}</kbd></a>"


def pair_html(night: Night, stops: Sequence[PairStop], position: int, photo_thumb: Callable,
              picture_png: Callable) -> str:
    """The page of ``stops[position]``: full-size PAIR-X picture, photos, names, metrics, navigation.

    ``picture_png(card)`` gives the full PNG's path relative to OUT (None without a picture).
    """
    stop = stops[position]
    card, upload = stop.card, stop.upload
    who = card.individual or _name(card.photo.uri)
    ties = near_ties(upload.cards, night.ranked).get(card.rank, [])

    def page_of(other: PairStop | None) -> str | None:
        return None if other is None else href(pair_page(night, other.number, other.card), NIGHT_DEPTH)

    previous = stops[position - 1] if position > 0 else None
    following = stops[position + 1] if position + 1 < len(stops) else None
    earlier = [s.number for s in stops if s.number < stop.number]
    previous_upload = next(s for s in stops if s.number == max(earlier)) if earlier else None  # its first pair
    next_upload = next((s for s in stops[position:] if s.number > stop.number), None)
    back = href(night_page(night, stop.page), NIGHT_DEPTH) + f"#u{stop.number}"
    nav = ("<nav class='pair' aria-label='pairs of this night'>"
           + _nav_link(page_of(previous), "&lsaquo; previous pair", "p", "prev")
           + _nav_link(page_of(following), "next pair &rsaquo;", "n", "next")
           + _nav_link(page_of(previous_upload), "&laquo; previous upload", "k")
           + _nav_link(page_of(next_upload), "next upload &raquo;", "j")
           + _nav_link(back, "back to the night", "b") + "</nav>")
    png = picture_png(card)
    if png is None:
        picture = "<p class='missing'>no PAIR-X picture</p>"
    else:
        picture = (f"<figure class='picture'><img src='{href(png, NIGHT_DEPTH)}' alt='PAIR-X picture: upload "
                   f"{esc(upload.name)} against {esc(who)}'><figcaption>PAIR-X picture at full resolution "
                   f"(<a href='{href(png, NIGHT_DEPTH)}'>PNG</a>): on top, the upload (left) and the candidate "
                   "(right) under their relevance heatmaps, with the top matches as lines; below, the pixel "
                   "relevance of the top matches, one colour each.</figcaption></figure>")
    rows = [("upload", f"{esc(upload.name)}"), ("candidate individual", esc(card.individual or "unknown")),
            ("candidate photo", esc(_name(card.photo.uri))), ("rank", f"#{card.rank + 1} of {len(upload.cards)}")]
    rows += [(k, esc(v)) for k, v in _metrics(card, night.ranked)]
    rows += [("layer", f"<code>{esc(card.layer)}</code>" if card.layer else "n/a"),
             ("model", _model_label(night)), ("night", esc(night.date))]
    if ties:
        rows.append(("near tie", _tie_badge(ties)))
    table = ("<table class='list metrics'><tbody>"
             + "".join(f"<tr><th scope='row'>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</tbody></table>")
    title = f"upload {stop.number}, #{card.rank + 1} {who}: PAIR-X review"
    body = [f"<p><a href='{href(REPORT_DIR + '/index.html', NIGHT_DEPTH)}'>&larr; all nights</a> &middot; "
            f"<a href='{back}'>{esc(night.date)}</a></p>",
            f"<main id='main'><section class='pair' id='pair' data-query='{esc(upload.photo.uri)}'"
            f"{_data('run', upload.run_id)} data-model='{esc(night.model_id)}' data-date='{esc(night.date)}'"
            f" data-rank='{card.rank}' data-gallery='{esc(card.photo.uri)}'{_data('pair', card.pair_id)}"
            f"{_data('layer', card.layer)}>",
            f"<h1>Upload {stop.number} &middot; #{card.rank + 1} {esc(who)}</h1>", nav,
            "<p class='legend'>Keys: <kbd>n</kbd>/<kbd>p</kbd> next/previous pair, <kbd>j</kbd>/<kbd>k</kbd> "
            "next/previous upload, <kbd>b</kbd> back to the night.</p>",
            table,
            "<div class='pair-photos'>"
            + _full_photo(photo_thumb(upload.photo), f"upload {upload.name}", f"upload: {esc(upload.name)}")
            + _full_photo(photo_thumb(card.photo), f"candidate {who}",
                          f"candidate: {esc(who)} ({esc(_name(card.photo.uri))})") + "</div>",
            picture, nav, "</section></main>"]
    links = [f"<link rel='{rel}' href='{page_of(other)}'>" for rel, other in (("prev", previous), ("next", following))
             if other is not None]
    return _document(title, body, links, banners_html([night]))


def errors_html(night: Night) -> str:
    if not len(night.errors):
        return "<h2 id='errors'>Errors</h2><p>None.</p>"
    rows = "".join(
        f"<tr><td>{esc(r.stage)}</td><td>{esc(r.item)}</td><td>{esc(r.error_type)}</td>"
        f"<td class='msg'>{esc(r.message if r.message is not None else '')}</td></tr>"
        for r in night.errors.itertuples(index=False))
    return (f"<h2 id='errors'>Errors ({len(night.errors)})</h2><table class='list errors'><thead><tr>"
            "<th scope='col'>stage</th><th scope='col'>item</th><th scope='col'>type</th><th scope='col'>message</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")
