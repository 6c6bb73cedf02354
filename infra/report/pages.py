"""HTML of the review site: plain pages, inline CSS, no external resources, relative links."""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Callable, Sequence

from .data import Card, Night, Upload

REPORT_DIR = "report"


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


NIGHT_DEPTH = 3  # report/nights/<slug>/
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
table.errors td.msg{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;max-width:800px}
"""

KEYS_SCRIPT = """
<script>
document.addEventListener('keydown', function (event) {
  if (event.altKey || event.ctrlKey || event.metaKey || /INPUT|TEXTAREA|SELECT/.test(event.target.tagName)) return;
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


def _document(title: str, body: Sequence[str], head_links: Sequence[str] = ()) -> str:
    return "\n".join([
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(title)}</title>", *head_links, f"<style>{CSS}</style></head><body>",
        "<a class='skip' href='#main'>Skip to content</a>", *body, KEYS_SCRIPT, "</body></html>",
    ])


def _model_label(night: Night) -> str:
    if night.model_spec:
        return f"<code>{esc(night.model_spec)}</code> <small>({esc(night.model_id)})</small>"
    return f"<code>{esc(night.model_id)}</code>"


def index_html(nights: Sequence[Night], page_counts: dict[str, int] | None = None) -> str:
    """The list of nights: date, model, uploads, pairs, failures, link to the night's first page."""
    rows = []
    for night in nights:
        link = href(night_page(night, 1), INDEX_DEPTH)
        rows.append(
            f"<tr><td><a href='{link}'>{esc(night.date)}</a></td><td>{_model_label(night)}</td>"
            f"<td class='num'>{len(night.uploads)}</td><td class='num'>{night.n_pairs}</td>"
            f"<td class='num'>{len(night.errors)}</td></tr>")
    body = ["<main id='main'><h1>PAIR-X review: nights</h1>",
            "<p class='legend'>Each night lists its uploads with their ranked gallery candidates and PAIR-X "
            "pictures. Keyboard: Tab moves between links, Enter opens.</p>"]
    if rows:
        body += ["<table class='list'><caption class='skip'>Nights</caption><thead><tr><th scope='col'>date (UTC)</th>"
                 "<th scope='col'>model</th><th scope='col'>uploads</th><th scope='col'>pairs</th>"
                 "<th scope='col'>failures</th></tr></thead><tbody>", *rows, "</tbody></table>"]
    else:
        body.append("<p>No nights recorded yet.</p>")
    body.append("</main>")
    return _document("PAIR-X review", body)


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


def _card(card: Card, photo: tuple[str, str] | None, picture: tuple[str, str] | None, ranked: bool) -> str:
    name = card.photo.uri.rstrip("/").rsplit("/", 1)[-1]
    who = card.individual or name
    metrics = [("similarity", fmt(card.similarity)), ("IRM", fmt(card.irm))]
    if ranked:
        metrics.append(("re-rank", fmt(card.rerank_score)))
    if card.n_matches is not None:
        metrics.append(("matches", str(card.n_matches)))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in metrics)
    if picture is None:
        pic = "<p class='missing'>no PAIR-X picture</p>"
    else:
        preview, full = picture
        pic = (f"<a class='pic' href='{href(full, NIGHT_DEPTH)}' title='PAIR-X picture, full size'>"
               f"<img src='{href(preview, NIGHT_DEPTH)}' alt='PAIR-X picture: upload against {esc(who)}' "
               f"loading='lazy'></a>")
    layer = f"<div><small>layer <code>{esc(card.layer)}</code></small></div>" if card.layer else ""
    return (f"<article class='card{' top' if card.rank == 0 else ''}' data-rank='{card.rank}'>"
            f"<div class='head'>{_img(photo, f'candidate {who}')}"
            f"<div><div class='who'>#{card.rank + 1} {esc(who)}</div>"
            f"<div><small>{esc(name)}</small></div><dl>{dl}</dl></div></div>{pic}{layer}</article>")


def night_html(night: Night, page: int, pages: int, uploads: Sequence[Upload], first_index: int,
               photo_thumb: Callable, picture_thumb: Callable, errors_html: str) -> str:
    """One page of a night: its uploads ``uploads`` (the ``page``-th slice), errors on page 1."""
    k = max(1, night.top_k)
    title = f"{night.date}: PAIR-X review"
    order = ("Candidates ranked by re-rank score = 0.5 &times; similarity + 0.5 &times; IRM (similarity alone "
             "where IRM is n/a: fewer than 5 matches or no relevance among them)." if night.ranked else
             "Pairs of each first image, by similarity.")
    body = [f"<p><a href='{href(REPORT_DIR + '/index.html', NIGHT_DEPTH)}'>&larr; all nights</a></p>",
            f"<main id='main'><h1>{esc(night.date)} &middot; {len(night.uploads)} uploads, {night.n_pairs} pairs, "
            f"{len(night.errors)} failures</h1>",
            f"<p class='legend'>Model {_model_label(night)}. {order} PAIR-X picture: on top, the upload (left) and "
            "the candidate (right) under their relevance heatmaps, with the top matches as lines; below, the pixel "
            "relevance of the top matches, one colour each, over faded photos. Click a picture or photo to enlarge. "
            "Keys: <kbd>j</kbd>/<kbd>k</kbd> next/previous upload, <kbd>n</kbd>/<kbd>p</kbd> next/previous page.</p>",
            _pager(night, page, pages)]
    for offset, upload in enumerate(uploads):
        number = first_index + offset + 1
        name = upload.photo.uri.rstrip("/").rsplit("/", 1)[-1]
        cards = "".join(_card(c, photo_thumb(c.photo), picture_thumb(c), night.ranked) for c in upload.cards)
        body.append(
            f"<section class='upload' id='u{number}' tabindex='-1' aria-label='upload {number}: {esc(name)}'>"
            f"<div class='query'><div><strong>upload {number}</strong></div>"
            f"{_img(photo_thumb(upload.photo), f'upload {name}')}"
            f"<div>{esc(name)}</div></div><div class='cands' style='--k:{k}'>{cards}</div></section>")
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
    return _document(title, body, links)


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
