"""The run's Prefect artifact: the review site's public link and tonight's uploads with their top candidate."""

from __future__ import annotations

import asyncio

import pytest
from night_helpers import write_night

pytestmark = [pytest.mark.integration]


def test_the_night_artifact_links_the_site_and_lists_each_upload(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.config import NightlyConfig
    from flows.nightly import nightly

    night = write_night(tmp_path / "night", 3, seed=12)
    config = NightlyConfig(uploads=str(night / "uploads"), gallery=str(night / "gallery"), out=str(tmp_path / "out"),
                           model="demo", top_k=1, k_colors=0, workers=0, public_url="https://reviews.example.org/night")
    state = nightly(config, return_state=True)
    assert state.is_completed()

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    mine = [a for a in asyncio.run(artifacts())
            if a.flow_run_id == state.state_details.flow_run_id and a.key == "pairx-nightly-summary"]
    assert len(mine) == 1
    text = mine[0].data
    assert "https://reviews.example.org/night/report/index.html" in text
    table = text[text.index("## Tonight's uploads"):].splitlines()
    rows = [line for line in table if line.startswith("| ") and "upload |" not in line]
    assert len(rows) == 3 and all("ind-" in row for row in rows), text
