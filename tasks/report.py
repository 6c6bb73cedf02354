"""Prefect task: write or update the review site (``<OUT>/report/``) at the end of a run."""

from __future__ import annotations

from typing import Any, Mapping

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from infra.report import build_report
from infra.storage import retry_transient


@task(name="write_report", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      persist_result=False, cache_policy=NO_CACHE)
def write_report_task(out: str, date: str | None = None, model: str | None = None, public_url: str | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> str:
    """Rebuild the pages of ``date``'s night(s) (all nights when None) and the index.

    Returns the address of ``report/index.html`` to print in the run summary: the URL under
    ``public_url`` when given, else its storage URL.
    """
    return build_report(out, date, model, public_url=public_url, storage_options=storage_options).url
