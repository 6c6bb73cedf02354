"""Upkeep commands of ``pairx``: gc, compact, verify, cache info/prune, report.

:func:`register_upkeep` adds them to the Typer app of ``flows/cli.py``. Light on purpose (typer
only at import; the work is imported inside each command).

Rules shared by every command here:

- OUT must be a pairx output root (it has ``tables/`` or ``_pairx/``): anything else is exit 2,
  and nothing is created there.
- Commands that change OUT (gc, compact, cache prune, verify --repair, report) hold OUT's lease
  while they work, and refuse (exit 1, naming the run) while a run writes OUT, unless
  ``--lease-wait`` lets them wait.
- Ages, sizes and counts must be positive: anything else is exit 2.

Exit codes: 0 done, 1 refused (a run holds OUT) or damage found (verify), 2 bad input or options.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from typing import Iterator, NoReturn, Optional

import click
import typer

__all__ = ["register_upkeep"]

EXIT_FAILED, EXIT_USAGE = 1, 2

JsonOut = typer.Option(False, "--json", help="print the machine-readable result (JSON) instead of the human one")
Cache = typer.Option(None, "--cache", help="activation cache URL (default OUT/cache)")
LeaseWait = typer.Option(0.0, "--lease-wait", help="seconds to wait for a run holding OUT to finish "
                                                   "(default: refuse at once)")


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """A run holding OUT or a damaged table: exit 1 naming it; any other error: one line, exit 2
    (with ``--debug``: the traceback)."""
    from infra.lease import OutputLockedError
    from infra.tables import DamagedTableError

    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except (OutputLockedError, DamagedTableError) as error:
        _fail(str(error), EXIT_FAILED)
    except Exception as error:  # noqa: BLE001 - bad input, unreadable output root
        if _debug():
            raise
        _fail(str(error))


def _positive(value: Optional[float], option: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        _fail(f"{option} must be a positive number, got {value:g}")


def _not_negative(value: float, option: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        _fail(f"{option} must be 0 or more, got {value:g}")


def _output_root(out: str, storage_options: Optional[dict] = None) -> None:
    from infra.verify import require_output_root

    with _reported():
        require_output_root(out, storage_options)


@contextlib.contextmanager
def _holding_lease(out: str, what: str, wait_s: float, storage_options: Optional[dict] = None) -> Iterator[None]:
    from infra.lease import output_lease

    with _reported():
        lease = output_lease(out, f"{what}-{uuid.uuid4().hex[:12]}", what, wait_s=wait_s,
                             storage_options=storage_options)
    with lease:
        yield


# ------------------------------------------------------------------------------ gc
def gc_cmd(
    out: str = typer.Argument(..., help="output root: folder or URL (s3://bucket/prefix)"),
    min_age_hours: float = typer.Option(1.0, "--min-age-hours", help="with --no-lease only: remove only files older "
                                                                     "than this (a batch still being written is "
                                                                     "younger)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, remove nothing"),
    no_lease: bool = typer.Option(False, "--no-lease", help="work while a run may hold OUT: the writers' state is "
                                                            "then unknown, so --min-age-hours applies"),
    lease_wait: float = LeaseWait,
) -> None:
    """Remove what interrupted batches left under OUT: uncommitted matches files, pictures, temp files.

    Holds OUT's lease while it works (refused while a run writes OUT): every run that left files
    has then ended, so their orphans go whatever their age.
    """
    _positive(min_age_hours, "--min-age-hours")
    _not_negative(lease_wait, "--lease-wait")
    _output_root(out)
    from infra.gc import collect_orphans

    with contextlib.ExitStack() as stack:
        if not no_lease:
            stack.enter_context(_holding_lease(out, "gc", lease_wait))
        with _reported():
            report = collect_orphans(out, min_age_s=min_age_hours * 3600, dry_run=dry_run, runs_ended=not no_lease)
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(report.matches_files)} uncommitted matches file(s), {len(report.pictures)} "
               f"picture(s), {len(report.temp_files)} temporary file(s)")
    for url in report.matches_files + report.pictures + report.temp_files:
        typer.echo(f"  {url}")


# ------------------------------------------------------------------------------ compact
def compact_cmd(
    out: str = typer.Argument(..., help="output root (a local folder)"),
    table: Optional[list[str]] = typer.Option(None, "--table", help="only this table (repeatable; default: all)"),
    lease_wait: float = LeaseWait,
    json_output: bool = JsonOut,
) -> None:
    """Rewrite each table partition's small Parquet files into one file (readers see the same rows).

    Refuses while a run writes OUT (it holds the output's lease); runs started meanwhile wait.
    """
    _not_negative(lease_wait, "--lease-wait")
    from infra.compaction import compact_output

    with _reported():
        results = compact_output(out, table or None, lease_wait_s=lease_wait)
    if json_output:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    for r in results:
        typer.echo(f"{r.table}: {r.files_before} -> {r.files_after} file(s), {r.bytes_before / 1e6:.2f} -> "
                   f"{r.bytes_after / 1e6:.2f} MB ({len(r.partitions)} partition(s), {r.rows_rewritten} row(s) "
                   "rewritten)")


# ------------------------------------------------------------------------------ verify
def verify_cmd(
    out: str = typer.Argument(..., help="output root: folder or URL (s3://bucket/prefix)"),
    repair: bool = typer.Option(False, "--repair", help="move damaged table files aside, into OUT's quarantine "
                                                        "folder (the next run recomputes what they held)"),
    cache: Optional[str] = Cache,
    lease_wait: float = LeaseWait,
    json_output: bool = JsonOut,
) -> None:
    """Check every table file, cache checksum and picture reference of OUT (exit 1 if anything is damaged).

    Changes nothing unless --repair.
    """
    _not_negative(lease_wait, "--lease-wait")
    _output_root(out)
    from infra.verify import verify_output

    with contextlib.ExitStack() as stack:
        if repair:
            stack.enter_context(_holding_lease(out, "verify", lease_wait))
        with _reported():
            report = verify_output(out, repair=repair, cache=cache)
    if json_output:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(f"tables: {report.table_files} file(s), {len(report.damaged_tables)} damaged")
        for damaged in report.damaged_tables:
            typer.echo(f"  damaged: {damaged.url}: {damaged.reason}")
        typer.echo(f"cache: {report.cache_entries} row(s) checked, {len(report.damaged_cache)} damaged"
                   + (" (the next run that needs them recomputes them)" if report.damaged_cache else ""))
        for entry in report.damaged_cache[:20]:
            typer.echo(f"  damaged: {entry}")
        typer.echo(f"pictures: {report.pictures} referenced, {len(report.missing_pictures)} missing")
        for uri in report.missing_pictures[:20]:
            typer.echo(f"  missing: {uri}")
        if report.quarantined:
            typer.echo(f"moved {len(report.quarantined)} table file(s) to quarantine ({len(report.damaged_tables)} "
                       "damaged, the others depended on them); the next run recomputes what they held")
    if not report.ok and not (repair and not report.damaged_cache and not report.missing_pictures):
        raise typer.Exit(code=EXIT_FAILED)


# ------------------------------------------------------------------------------ cache
cache_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Inspect and prune the activation cache (embeddings and feature maps).")
CacheOut = typer.Argument(..., help="output root: folder or URL (its cache is OUT/cache unless --cache says)")


def _cache_url(out: str, cache: Optional[str]) -> str:
    """The cache of OUT; refuses (exit 2) when neither the cache nor a pairx output is there."""
    from infra.storage import OutputLayout, StorageTarget

    url = cache or OutputLayout(out).cache
    with _reported():
        present = StorageTarget.from_url(url).exists()
    if not present:
        _output_root(out)
    return url


@cache_app.command("info")
def cache_info_cmd(out: str = CacheOut, cache: Optional[str] = Cache, json_output: bool = JsonOut) -> None:
    """Models in the cache, with images, batches, layers and bytes."""
    from infra.cache_admin import cache_info

    url = _cache_url(out, cache)
    with _reported():
        infos = cache_info(url)
    if json_output:
        typer.echo(json.dumps([vars(info) for info in infos], indent=2))
        return
    typer.echo(f"cache {url}: {len(infos)} model(s), "
               f"{sum(i.bytes for i in infos) / 1e6:.1f} MB")
    for info in infos:
        typer.echo(f"  {info.model}: {info.images} image(s), {info.batches} batch(es), "
                   f"{info.bytes / 1e6:.1f} MB, layers {', '.join(info.layers) or '-'}")


@cache_app.command("prune")
def cache_prune_cmd(
    out: str = CacheOut, cache: Optional[str] = Cache,
    model: Optional[str] = typer.Option(None, "--model", help="model fingerprint (model_id) whose entries to delete"),
    older_than: Optional[float] = typer.Option(None, "--older-than", help="delete entries written more than DAYS ago"),
    yes: bool = typer.Option(False, "--yes", help="confirm a prune that deletes every entry of the cache"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be deleted, delete nothing"),
    lease_wait: float = LeaseWait,
) -> None:
    """Delete a model's entries (--model FP), or entries older than --older-than DAYS (of --model only, if given).

    Prints what it deletes first; a prune that would empty the whole cache needs --yes.
    """
    if model is None and older_than is None:
        _fail("give --model FP and/or --older-than DAYS")
    _positive(older_than, "--older-than")
    _not_negative(lease_wait, "--lease-wait")
    from infra.cache_admin import plan_prune, prune_model, prune_older_than

    url = _cache_url(out, cache)
    with _reported():
        plan = plan_prune(url, model=model, older_than_days=older_than)
    what = f"model {model}" if model else "all models"
    age = f" older than {older_than:g} day(s)" if older_than is not None else ""
    everything = plan.batches and plan.batches == plan.total_batches
    held_back = dry_run or (everything and not yes)
    typer.echo(f"{'would delete' if held_back else 'deleting'} {plan.batches} of {plan.total_batches} batch(es) "
               f"of {what}{age} in {url}")
    if dry_run:
        return
    if held_back:
        _fail("this deletes every entry of the cache; add --yes if that is what you want")
    with _holding_lease(out, "cache-prune", lease_wait), _reported():
        if older_than is not None:
            removed, freed = prune_older_than(url, older_than, model=model)
            typer.echo(f"removed {removed} batch(es) older than {older_than:g} day(s), {freed / 1e6:.1f} MB freed")
        else:
            freed = prune_model(url, model)
            typer.echo(f"removed model {model}: {freed / 1e6:.1f} MB freed")


# ------------------------------------------------------------------------------ registration
def register_upkeep(app: typer.Typer) -> None:
    """Add gc, compact, verify, cache (info, prune) and report to the ``pairx`` app."""
    from .report_cmd import report_cmd

    app.command("gc")(gc_cmd)
    app.command("compact")(compact_cmd)
    app.command("verify")(verify_cmd)
    app.add_typer(cache_app, name="cache")
    app.command("report")(report_cmd)
