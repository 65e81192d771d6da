"""prefect.yaml as a user deploys it: `prefect deploy --all` against a real server creates every
deployment with its typed parameters and schedule (a spec the JSON schema refuses fails here,
not in front of a user), and a process worker on the pool trains a run of one to Completed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, start_process, stop_process
from tests.test_doors import QUICK_SFT

pytestmark = pytest.mark.slow


def test_prefect_deploy_all_creates_every_deployment_and_a_worker_runs_one(prefect_server, tmp_path):
    from prefect import get_client
    from prefect.settings import get_current_settings

    env = {
        **os.environ,
        "PREFECT_API_URL": get_current_settings().api.url,
        "FINETUNE_FLOW_HOME": str(REPO),
    }
    prefect = [sys.executable, "-m", "prefect"]
    for name in ("finetune-local", "finetune-train"):
        pool = subprocess.run(
            [*prefect, "work-pool", "create", "--type", "process", name, "--overwrite"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-3000:]
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    with get_client(sync_client=True) as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
    assert {"sft/sft", "dpo/dpo", "grpo/grpo", "recipe/sft-then-grpo", "finetune-train/train"} <= set(found)
    assert found["finetune-train/train"].work_pool_name == "finetune-train"
    for entry in declared:
        if entry["name"] == "train":  # the pool's training step: tests/test_pool.py runs it
            continue
        flow_name = entry["entrypoint"].rsplit(":", 1)[1].removesuffix("_flow")
        deployment = found[f"{flow_name}/{entry['name']}"]
        assert deployment.parameters == entry["parameters"]  # accepted as declared, against the typed schema
        properties = deployment.parameter_openapi_schema["properties"]
        assert {"dry_run", "approval_timeout_s", "approve_up_to_usd"} <= set(properties)
    sft = found["sft/sft"]
    (schedule,) = sft.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.active is False  # declared inactive
    spec_schema = sft.parameter_openapi_schema["definitions"]["RunSpec"]["properties"]
    assert "description" in spec_schema["conversion"] and spec_schema["method"]["enum"] == ["sft", "dpo", "grpo"]
    # the worker, as the README starts it, picks up a run of the sft deployment and trains it
    log = tmp_path / "worker.log"
    worker = start_process([*prefect, "worker", "start", "--pool", "finetune-local", "--limit", "1"], log)
    try:
        from deployments.client import connect

        with connect() as api:
            assert api.find_deployment("sft").work_pool == "finetune-local"
            run = api.start_run("sft/sft", {**QUICK_SFT, "name": "from-the-pool"})
            done = api.wait(run.flow_run_id, timeout_s=420)
            assert done.state == "COMPLETED", log.read_text()[-3000:]
            assert done.name == "from-the-pool"
    finally:
        stop_process(worker)
