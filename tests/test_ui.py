"""The Prefect UI door, clicked through as a person would in a headless Chromium: a run started
from the sft deployment's form, its approval answered in the paused run's Resume form, its
artifacts read. Needs Debian's chromium (`.ci/run` installs it; skipped where it is missing)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers import PRICED, QUICK_SFT, seed_prefect_home


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_a_run_started_and_approved_in_the_ui_trains_and_a_cancel_stops_it(
    browser, trains, own_server, prefect_database: Path, tmp_path: Path
):
    """The rest of the run is what every other door's test checks; docs/take_screenshots.py
    follows this same walk-through to the finished run's artifacts."""
    from deployments.client import connect
    from tasks.core.rundir import runs_root
    from tests.ui_browser import _api_json, deployments_served, server_with_ui, walkthrough

    spec = {**QUICK_SFT, **PRICED, "name": "ui-run"}
    home = seed_prefect_home(tmp_path / "prefect-home", prefect_database)
    with server_with_ui(home, _free_port(), tmp_path / "server.log") as base:
        with deployments_served(base, dict(os.environ), tmp_path / "serve.log"):
            done = walkthrough(base, spec, tmp_path, reason="approved in the browser test", to_the_end=False)
            run = _api_json(f"{base}/api/flow_runs/{done['flow_run_id']}")
            with connect(f"{base}/api") as api:
                api.cancel(done["flow_run_id"])
                ended = api.wait(done["flow_run_id"], until=("CANCELLED",), timeout_s=120)
    assert done["sent"]["run_input"]["approve"] is True
    assert done["sent"]["run_input"]["max_usd"] == 2  # the form came pre-filled with the spec's cap
    assert done["state"] in ("RUNNING", "COMPLETED"), (tmp_path / "serve.log").read_text()[-3000:]
    assert run["name"] == "ui-run"  # the runs list shows the run's own name
    assert ended.state in ("CANCELLED", "COMPLETED")
    assert (runs_root() / "ui-run" / "approval.json").exists()
    for shot in ("custom-run-submitted.png", "resume-form.png", "resume-form-filled.png", "resumed.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot
