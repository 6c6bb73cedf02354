"""User documents say what the code does: one outputs document, the generated schema file linked
from it (not copied), and the picture path as :func:`infra.viz.viz_uri` builds it."""

from __future__ import annotations

from pathlib import Path

from infra.tables import schema_markdown
from infra.viz import viz_uri

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS_DOC = ROOT / "docs" / "outputs.md"
SCHEMA_FILE = ROOT / "infra" / "README_outputs.md"


def _lines(path: Path) -> set[str]:
    """The substantial lines of a document (prose, rows, examples), stripped."""
    return {line.strip() for line in path.read_text().splitlines() if len(line.strip()) >= 30}


def test_the_outputs_document_and_the_schema_file_share_no_text():
    assert _lines(OUTPUTS_DOC) & _lines(SCHEMA_FILE) == set()
    assert "infra/README_outputs.md" in OUTPUTS_DOC.read_text()  # linked instead
    assert "docs/outputs.md" in SCHEMA_FILE.read_text()


def test_the_schema_file_is_generated_text_under_a_short_header():
    text = SCHEMA_FILE.read_text()
    assert text.endswith(schema_markdown())
    assert len(text) - len(schema_markdown()) < 1000


def test_documented_picture_path_is_where_pictures_are_written():
    written = viz_uri("/OUT", "MODEL", "PAIR", "LAYER", commit_id="COMMIT")
    documented = written.replace("/OUT/", "").replace("MODEL", "<model_id>").replace("PAIR", "<pair_id>") \
        .replace("LAYER", "<layer>").replace("COMMIT", "<commit_id>")
    assert documented == "viz/model=<model_id>/<pair_id>/<layer>-<commit_id>.png"
    for doc in (OUTPUTS_DOC, ROOT / "README.md"):
        text = doc.read_text()
        assert documented in text, doc
        assert "<pair_id>/<layer>.png" not in text, doc  # the path of pictures before commit ids
