"""The CLI's temporary Prefect server: what it runs, and what flows under it skip."""

from __future__ import annotations

import json
import urllib.request

import pytest

from infra.prefect_server import TemporaryAPI


@pytest.mark.timeout(120)
def test_temporary_server_polls_for_nothing_and_its_flows_send_no_heartbeats(monkeypatch):
    """Its scheduling services only took CPU from the run's workers; each flow's exit waited up
    to 1 s for the heartbeat thread."""
    from prefect.settings import get_current_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api = TemporaryAPI()
    with api.active():
        heartbeat = get_current_settings().flows.heartbeat_frequency
        with urllib.request.urlopen(f"{api.server.api_url}/admin/settings", timeout=10) as response:
            services = json.load(response)["server"]["services"]
    assert heartbeat is None
    enabled = {name: value["enabled"] for name, value in services.items() if isinstance(value, dict)}
    for name in ("scheduler", "late_runs", "foreman", "pause_expirations", "repossessor", "cancellation_cleanup"):
        assert enabled[name] is False, name
    for name in ("event_persister", "task_run_recorder"):  # task runs and logs are still recorded
        assert enabled[name] is True, name
    assert api.server is None  # stopped on leaving
    assert get_current_settings().flows.heartbeat_frequency is not None  # the setting was scoped
