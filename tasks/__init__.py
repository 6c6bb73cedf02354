"""Prefect tasks (thin wrappers over ``infra`` and ``pairx_core``).

Every process that runs them (the flow's, each Dask worker) redacts credentials from its log
records (``infra.redaction``).
"""

from infra.redaction import install_log_redaction

install_log_redaction()
