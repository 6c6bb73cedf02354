"""Damaged activation-cache chunks (deleted, cut short, garbled) of embeddings or feature maps are recomputed
in the run that finds them; the next run finds a clean cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from night_helpers import write_night

MODEL = "timm:efficientnet_b0?size=64"
LAYER = "backbone.blocks.3"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_night(tmp_path_factory.mktemp("cache-heal"), 2, seed=3)


def _damage(chunk: Path, fault: str) -> None:
    raw = chunk.read_bytes()
    if fault == "deleted":
        chunk.unlink()
    elif fault == "truncated":
        chunk.write_bytes(raw[: len(raw) // 2])
    else:  # garbled: every byte of the second half flipped
        chunk.write_bytes(raw[: len(raw) // 2] + bytes(b ^ 0xFF for b in raw[len(raw) // 2:]))


def _chunks(cache: Path, array: str) -> list[Path]:
    marker = "/embeddings/c/" if array == "embeddings" else "/features/"
    return sorted(p for p in cache.rglob("*") if p.is_file() and marker in str(p) and "/c/" in str(p))


def _embed(photos: Path, out: Path, run_id: str):
    from tasks.embed import embed_images

    uris = sorted(str(p) for p in photos.rglob("*.png"))
    return uris, embed_images(uris, model=MODEL, cache_url=str(out / "cache"), layers=[LAYER], run_id=run_id,
                              out=str(out), device="cpu")


def _stage1(photos: Path, out: Path, hashes: dict[str, str]):
    from tasks.stage1 import Stage1Pair, Stage1Settings, stage1_pairs

    uploads = sorted(str(p) for p in (photos / "uploads").glob("*.png"))
    gallery = sorted(str(p) for p in (photos / "gallery").rglob("*.png"))
    pairs = [Stage1Pair(f"{i}-{j}", q, hashes[q], g, hashes[g]) for i, q in enumerate(uploads)
             for j, g in enumerate(gallery)]
    return pairs, stage1_pairs(pairs, Stage1Settings(model=MODEL, cache_url=str(out / "cache"), layer=LAYER,
                                                     k_lines=3, device="cpu"))


def _next_run(photos: Path, out: Path, run_id: str):
    """What a night does with the cache: embed (recomputes damaged embeddings), then stage 1."""
    _, embedded = _embed(photos, out, run_id)
    pairs, judged = _stage1(photos, out, embedded.hashes)
    assert set(judged.metrics) == {p.pair_id for p in pairs}
    assert all(np.isfinite(m["similarity"]) for m in judged.metrics.values())
    return embedded, judged


@pytest.mark.slow
def test_damaged_cache_chunks_are_recomputed_then_clean(photos, tmp_path):
    from infra.cache_admin import damaged_cache_entries

    out = tmp_path / "out"
    _, first = _embed(photos, out, "run-1")
    assert first.computed == 4 and first.damaged == 0
    _, reference = _stage1(photos, out, first.hashes)

    # feature maps (one chunk per image): three images, three kinds of damage; stage 1 recomputes them
    for chunk, fault in zip(_chunks(out / "cache", "features"), ("deleted", "truncated", "garbled")):
        _damage(chunk, fault)
    assert len(damaged_cache_entries(str(out / "cache"))[1]) == 3  # `pairx verify` sees them
    embedded, judged = _next_run(photos, out, "run-2")
    assert embedded.damaged == 0 and judged.cache_damaged == 3

    # embeddings (one chunk per batch): each kind of damage, each followed by a run; the embed step recomputes
    for number, fault in enumerate(("deleted", "truncated", "garbled")):
        _damage(_chunks(out / "cache", "embeddings")[-1], fault)
        embedded, _ = _next_run(photos, out, f"run-e{number}")
        assert embedded.damaged >= 1

    # the run after finds nothing to repair, and the same answers as before the damage
    embedded, judged = _next_run(photos, out, "run-last")
    assert embedded.damaged == 0 and embedded.computed == 0 and judged.cache_damaged == 0
    assert damaged_cache_entries(str(out / "cache"))[1] == []
    for pair_id, metrics in judged.metrics.items():
        assert metrics["similarity"] == pytest.approx(reference.metrics[pair_id]["similarity"], abs=1e-5)
