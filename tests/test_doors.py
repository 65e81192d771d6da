"""The doors other than the command line, each against a real Prefect server: the deployments
served by `python -m deployments.serve` and driven over REST (the typed client, and the README's
curl sequence as written), and a deployment run by a process worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, api_url, process_env, start_process, stop_process

pytestmark = pytest.mark.slow

QUICK_SFT = {
    "method": "sft",
    "model": "tiny",
    "dataset": str(REPO / "examples" / "data" / "sft_chat.jsonl"),
    "training": {"max_steps": 6, "learning_rate": 3.0e-3, "per_device_train_batch_size": 8, "max_length": 96},
    "evaluation": {"generations": 0},
    "outputs": {"gguf": []},
}
# This machine at a price, as a team prices its own GPU box: a few tenths of a cent per run,
# above an auto-approval of 0, so the run pauses for a person (or an agent's user).
PRICED = {"flavors": {"local-cpu": {"price_per_hour": 2.0}}, "budget": {"max_usd": 2, "auto_approve_usd": 0}}


def test_the_typed_client_starts_follows_approves_and_reads_a_served_run(served):
    from deployments.client import AnswerRefused, connect
    from tasks.rundir import runs_root

    spec = {**QUICK_SFT, **PRICED, "name": "rest-approved"}
    with connect() as api:
        run = api.start_run("sft", spec)
        paused = api.wait(run.flow_run_id, timeout_s=240)
        assert paused.state == "PAUSED", served.read_text()[-3000:]
        assert paused.name == "rest-approved"  # the run's own name, not Prefect's random one
        needs = paused.needs
        assert needs is not None and needs.kind == "spend" and needs.max_usd == 2
        assert 0 < needs.estimated_usd <= needs.estimated_usd_high < 2
        assert paused.summary.startswith("needs approval: estimated $")
        with pytest.raises(AnswerRefused, match="above the spec's budget.max_usd"):
            api.answer(run.flow_run_id, approve=True, max_usd=50)  # an agent may not raise the user's cap
        assert api.status(run.flow_run_id).state == "PAUSED"
        api.answer(run.flow_run_id, approve=True, reason="tested over REST")
        done = api.wait(run.flow_run_id, timeout_s=300)
        assert done.state == "COMPLETED", api.logs(run.flow_run_id)[-20:]
        keys = {a.key for a in api.artifacts(run.flow_run_id)}
        assert {"plan-rest-approved", "progress-rest-approved", "report-rest-approved"} <= keys
        assert done.progress_percent == 100
        assert "tested over REST" in api.report(run.flow_run_id)
        assert any("waits up to" in line for line in api.logs(run.flow_run_id))
        with pytest.raises(AnswerRefused, match="not waiting for a decision"):
            api.answer(run.flow_run_id, approve=True)
    assert (runs_root() / "rest-approved" / "model").is_dir()


def test_a_paused_run_cancelled_over_rest_ends_cancelled_and_spends_nothing(served):
    from deployments.client import connect
    from tasks.rundir import runs_root

    spec = {**QUICK_SFT, **PRICED, "name": "rest-cancelled"}
    with connect() as api:
        run = api.start_run("sft/sft", spec)
        assert api.wait(run.flow_run_id, timeout_s=240).state == "PAUSED"
        api.cancel(run.flow_run_id)
        ended = api.wait(run.flow_run_id, until=("CANCELLED",), timeout_s=120)
        assert ended.state == "CANCELLED", served.read_text()[-3000:]
    assert not (runs_root() / "rest-cancelled" / "job.json").exists()  # no job was ever submitted


def _readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"README has no bash block after <!-- {marker} -->"
    return found.group(1)


def test_the_readme_curl_sequence_runs_as_written(served, tmp_path):
    """Every line of the README's REST section, run by bash against the served deployments."""
    script = _readme_block("rest-sequence")
    spec = {**QUICK_SFT, **PRICED, "name": "curl-run"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**process_env(), "API": api_url(), "SPEC_FILE": str(tmp_path / "spec.json")}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "COMPLETED" in done.stdout and "report-curl-run" in done.stdout
    assert done.stdout.rstrip().endswith("CANCELLED")  # the second run, cancelled while it waited


def test_a_deployment_from_prefect_yaml_runs_on_a_process_worker(prefect_server, tmp_path):
    from deployments.client import connect

    prefect = [sys.executable, "-m", "prefect"]
    for args in (
        ["work-pool", "create", "--type", "process", "finetune-local", "--overwrite"],
        ["--no-prompt", "deploy", "--name", "sft"],
    ):
        done = subprocess.run(
            [*prefect, *args], cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    log = tmp_path / "worker.log"
    worker = start_process([*prefect, "worker", "start", "--pool", "finetune-local", "--limit", "1"], log)
    try:
        with connect() as api:
            run = api.start_run("sft/sft", {**QUICK_SFT, "name": "from-the-pool"})
            done = api.wait(run.flow_run_id, timeout_s=420)
            assert done.state == "COMPLETED", log.read_text()[-3000:]
            assert done.name == "from-the-pool"
            assert api.find_deployment("sft").work_pool == "finetune-local"
    finally:
        stop_process(worker)
