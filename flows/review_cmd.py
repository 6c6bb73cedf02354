"""``pairx review OUT`` (serve the review site with decision controls) and ``pairx decide OUT``
(record decisions from the command line or a CSV file); registered on the CLI by
:func:`register_review_commands`."""

from __future__ import annotations

from typing import Optional

import typer

EXIT_USAGE = 2


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=EXIT_USAGE)


def review_cmd(
    out: str = typer.Argument(..., help="output root (a local folder) whose review site to serve"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; anything but loopback needs --token"),
    port: int = typer.Option(8765, "--port", help="port to listen on"),
    token: Optional[str] = typer.Option(None, "--token", envvar="PAIRX_REVIEW_TOKEN", show_envvar=True,
                                        help="secret every write must carry (Authorization: Bearer ...)"),
    flush_seconds: float = typer.Option(5.0, "--flush-seconds", help="journaled decisions go to the table at "
                                                                     "least this often (seconds)"),
    flush_rows: int = typer.Option(50, "--flush-rows", help="... and as soon as this many are journaled"),
) -> None:
    """Serve OUT's review site with decision controls (keys 1 2 3 n x s u, j/k) and the decisions API."""
    from pairx_core.errors import ConfigError

    from infra.report.server import check_binding, journal_folder, serve
    from infra.storage import OutputLayout

    try:
        check_binding(host, token)
        site = journal_folder(out).parent.parent / OutputLayout.REPORT
        if not site.is_dir():
            raise ConfigError(f"{OutputLayout(out).report} does not exist: run `pairx report {out}` first")
    except ConfigError as error:
        _fail(str(error))
    suffix = f"?token={token}" if token else ""
    typer.echo(f"review site: http://{host}:{port}/{OutputLayout.REPORT}/index.html{suffix}  (Ctrl-C to stop)")
    try:
        serve(out, host, port, token, flush_every_s=flush_seconds, flush_rows=flush_rows)
    except ConfigError as error:
        _fail(str(error))


def decide_cmd(
    out: str = typer.Argument(..., help="output root whose uploads are decided"),
    query: Optional[str] = typer.Option(None, "--query", help="URI of the upload (as in candidates.query)"),
    detection: Optional[str] = typer.Option(None, "--detection", help="camera-trap night: which detection of the "
                                            "photo (its candidates.query_detection_id)"),
    individual: Optional[str] = typer.Option(None, "--individual", help="match: the known individual it is"),
    new: Optional[str] = typer.Option(None, "--new", help="new individual: its name"),
    no_match: bool = typer.Option(False, "--no-match", help="none of the gallery's individuals, not named"),
    unsure: bool = typer.Option(False, "--unsure", help="cannot tell"),
    reviewer: Optional[str] = typer.Option(None, "--reviewer", help="who decided (required)"),
    note: Optional[str] = typer.Option(None, "--note", help="free text stored with the decision"),
    model: Optional[str] = typer.Option(None, "--model", help="model_id of the night decided on (default: latest)"),
    from_csv: Optional[str] = typer.Option(None, "--from-csv", help="CSV file of decisions (columns in "
                                                                    "docs/review.md); all are recorded or none"),
) -> None:
    """Record reviewer decisions: one from the options, or many from a CSV file (same checks as the server)."""
    from infra.decisions import DecisionError, DecisionRequest, record_decisions, requests_from_csv

    try:
        if from_csv is not None:
            if any(v is not None for v in (query, detection, individual, new, reviewer, note, model)) \
                    or no_match or unsure:
                raise DecisionError("--from-csv takes no other decision options (put them in the file)")
            requests, labels = requests_from_csv(from_csv)
        else:
            labels = None
            chosen = [name for name, on in (("--individual", individual is not None), ("--new", new is not None),
                                            ("--no-match", no_match), ("--unsure", unsure)) if on]
            if query is None or len(chosen) != 1:
                raise DecisionError("give --query and exactly one of --individual, --new, --no-match, --unsure "
                                    "(or --from-csv FILE)")
            decision = {"--individual": "match", "--new": "new_individual", "--no-match": "no_match",
                        "--unsure": "unsure"}[chosen[0]]
            requests = [DecisionRequest.from_mapping({
                "query": query, "detection_id": detection, "decision": decision, "reviewer": reviewer,
                "individual": individual or new,
                "note": note, "model_id": model})]
        rows = record_decisions(out, requests, labels=labels)
    except DecisionError as error:
        _fail(str(error))
    for row in rows:
        what = row["decision"] + (f" {row['individual']}" if row["individual"] else "")
        which = f" (detection {row['detection_id']})" if row.get("detection_id") else ""
        typer.echo(f"{row['query']}{which}: {what} (night run {row['night_run_id']}, by {row['reviewer']})")
    typer.echo(f"{len(rows)} decision(s) recorded")
    from infra.report import refresh_index

    refresh_index(out)  # the review site's index shows the figures with these decisions


def register_review_commands(app: typer.Typer) -> None:
    app.command("review")(review_cmd)
    app.command("decide")(decide_cmd)
