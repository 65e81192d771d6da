"""The doors other than the command line, each against a real Prefect server: the deployments
served by `python -m deployments.serve` and driven over REST (the typed client, and the curl
sequence of docs/ways-in.md as written). A deployment run by a process worker is in test_deployments.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import PRICED, QUICK_SFT, REPO, api_url, process_env


def test_the_typed_client_starts_follows_and_cancels_a_served_run_and_refuses_a_higher_cap(served):
    """Approval to the end is the MCP test's (tests/test_mcp.py), on this same client."""
    from deployments.client import AnswerRefused, connect
    from tasks.core.rundir import runs_root

    spec = {**QUICK_SFT, **PRICED, "name": "rest-cancelled"}
    with connect() as api:
        run = api.start_run("sft", spec)
        paused = api.wait(run.flow_run_id, timeout_s=240)
        assert paused.state == "PAUSED", served.read_text()[-3000:]
        assert paused.name == "rest-cancelled"  # the run's own name, not Prefect's random one
        needs = paused.needs
        assert needs is not None and needs.kind == "spend" and needs.max_usd == 2
        assert 0 < needs.estimated_usd <= needs.estimated_usd_high < 2
        assert paused.summary.startswith("needs approval: estimated $")
        with pytest.raises(AnswerRefused, match="above the spec's budget.max_usd"):
            api.answer(run.flow_run_id, approve=True, max_usd=50)  # an agent may not raise the user's cap
        assert api.status(run.flow_run_id).state == "PAUSED"
        assert "plan-rest-cancelled" in {a.key for a in api.artifacts(run.flow_run_id)}
        api.cancel(run.flow_run_id)
        ended = api.wait(run.flow_run_id, until=("CANCELLED",), timeout_s=120)
        assert ended.state == "CANCELLED", served.read_text()[-3000:]
        assert any("waits up to" in line for line in api.logs(run.flow_run_id))  # the pause said how to answer
        with pytest.raises(AnswerRefused, match="not waiting for a decision"):
            api.answer(run.flow_run_id, approve=True)
    assert not (runs_root() / "rest-cancelled" / "job.json").exists()  # no job was ever submitted


def _docs_block(marker: str, page: str = "ways-in.md") -> str:
    text = (REPO / "docs" / page).read_text()
    found = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"docs/{page} has no bash block after <!-- {marker} -->"
    return found.group(1)


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_the_docs_curl_sequence_runs_as_written(trains, served, tmp_path):
    """Every line of the REST section of docs/ways-in.md, run by bash against the served deployments,
    with the shipped JSON spec it names."""
    script = _docs_block("rest-sequence")
    env = {**process_env(), "API": api_url(), "SPEC_FILE": str(REPO / "examples" / "sft-approval.json")}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + served.read_text()[-3000:]
    assert "COMPLETED" in done.stdout and "report-curl-run" in done.stdout
    assert done.stdout.rstrip().endswith("CANCELLED")  # the second run, cancelled while it waited
