"""Reading the review site back: links, images and candidate cards of its pages (no browser)."""

from __future__ import annotations

import urllib.parse
from html.parser import HTMLParser
from pathlib import Path


class PageParser(HTMLParser):
    """Collects ``src``/``href`` values, ``<script src>``/stylesheets, and cards per upload section."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []
        self.uploads: list[list[int]] = []  # per <section class="upload">: data-rank of its cards
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if (tag == "script" and attrs.get("src")) or (tag == "link" and attrs.get("rel") == "stylesheet"):
            self.external.append(attrs.get("src") or attrs.get("href"))
        if tag == "section" and "upload" in attrs.get("class", "").split():
            self.uploads.append([])
        if tag == "article" and "card" in attrs.get("class", "").split():
            self.uploads[-1].append(int(attrs["data-rank"]))

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text())
    return parser


def resolve(page: Path, reference: str) -> Path | None:
    """The local file a relative link of ``page`` points at (None for in-page anchors)."""
    target = reference.split("#", 1)[0]
    if not target:
        return None
    assert "://" not in target and not target.startswith("/"), f"not a relative link: {reference}"
    return (page.parent / urllib.parse.unquote(target)).resolve()


def site_pages(out: Path) -> list[Path]:
    return sorted((out / "report").rglob("*.html"))
