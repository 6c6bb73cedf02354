"""``pairx report OUT``: the typer command function (registered by ``flows/upkeep_cmd.py``)."""

from __future__ import annotations

import json
from typing import Optional

import typer


def _options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--storage-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key] = json.loads(value) if value[:1] in "[{" or value in ("true", "false") else value
    return options


def report_cmd(
    out: str = typer.Argument(..., help="output root: folder or URL (s3://bucket/prefix)"),
    date: Optional[str] = typer.Option(None, "--date", help="only rewrite this night's pages (YYYY-MM-DD, UTC)"),
    model: Optional[str] = typer.Option(None, "--model", help="only this model (model_id or spec as recorded)"),
    public_url: Optional[str] = typer.Option(None, "--public-url", help="base URL where OUT is published"),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option",
                                                       help="fsspec option KEY=VALUE (repeatable)"),
    lease_wait: float = typer.Option(0.0, "--lease-wait", help="seconds to wait for a run holding OUT to finish "
                                                               "(default: refuse at once)"),
) -> None:
    """Write the review site OUT/report/ (static HTML: nights, uploads, ranked candidates, PAIR-X pictures).

    Refuses while a run writes OUT (a run rewrites its night's pages itself).
    """
    from infra.report import build_report

    from .upkeep_cmd import _holding_lease, _not_negative, _output_root, _reported

    _not_negative(lease_wait, "--lease-wait")
    options = _options(storage_option or [])
    _output_root(out, options or None)
    with _holding_lease(out, "report", lease_wait, options or None), _reported():
        result = build_report(out, date, model, public_url=public_url, storage_options=options)
    typer.echo(f"{result.nights} night(s) written; open {result.url}")
