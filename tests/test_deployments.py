"""prefect.yaml as a user deploys it: `prefect deploy --all` against a real server creates every
deployment with its typed parameters and schedule (a spec the JSON schema refuses fails here,
not in front of a user); a process worker on the pool runs the sft deployment, whose training
step (`backend: prefect-pool`) goes to the training pool's own worker and comes back; and a
run cancelled while its pool trains leaves no training process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, start_process, stop_process
from tests.test_doors import QUICK_SFT

pytestmark = pytest.mark.slow


def test_prefect_deploy_all_creates_every_deployment_and_workers_train_a_run_through_the_pool(prefect_server, tmp_path):
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
    # workers started as the README starts them: one for the lifecycle flows, one for the training
    # pool. A run of the sft deployment trains through the pool (as 2 processes, the launch every
    # backend uses), with shared storage in a local folder; another is cancelled while it trains.
    local_log, train_log = tmp_path / "worker.log", tmp_path / "train-worker.log"
    worker = start_process([*prefect, "worker", "start", "--pool", "finetune-local", "--limit", "1"], local_log)
    trainer = start_process([*prefect, "worker", "start", "--pool", "finetune-train"], train_log)
    storage = tmp_path / "shared"
    pooled = {**QUICK_SFT, "backend": "prefect-pool", "pool": {"storage": str(storage)}}
    logs = lambda: local_log.read_text()[-2000:] + train_log.read_text()[-2000:]  # noqa: E731
    try:
        from deployments.client import connect

        with connect() as api, get_client(sync_client=True) as client:
            assert api.find_deployment("sft").work_pool == "finetune-local"
            two = {**pooled, "distributed": {"processes": 2}, "name": "pooled"}
            done = api.wait(api.start_run("sft/sft", two).flow_run_id, timeout_s=420)
            assert done.state == "COMPLETED", logs()
            assert done.name == "pooled"
            (child,) = _child_runs(client, "pooled")
            assert child.name == "pooled-train-1" and child.state.type.value == "COMPLETED"
            assert child.work_pool_name == "finetune-train"
            outputs = storage / "pooled" / "attempt-1" / "outputs"
            assert (outputs / "train_result.json").exists() and list((outputs / "model").glob("*.safetensors"))
            run_dir = Path(os.environ["FINETUNE_RUNS_DIR"]) / "pooled"
            log = (run_dir / "logs" / "train.log").read_text()  # mirrored from the storage while it ran
            assert "process 1 of 2 trained 6 optimizer steps" in log
            report = (run_dir / "report.md").read_text()
            assert "job: prefect-pool" in report and "pooled-train-1" in report
            assert list((run_dir / "model").glob("*.safetensors"))  # fetched from the storage

            slow = {**pooled, "training": {**QUICK_SFT["training"], "max_steps": 2000}, "name": "pooled-cancelled"}
            parent = api.start_run("sft/sft", slow).flow_run_id
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:  # until the pool's worker is training it
                children = _child_runs(client, "pooled-cancelled")
                if children and children[0].state.type.value == "RUNNING" and _trainings():
                    break
                time.sleep(1)
            else:
                raise AssertionError(logs())
            api.cancel(parent)
            assert api.wait(parent, timeout_s=120).state == "CANCELLED", logs()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                _child_runs(client, "pooled-cancelled")[0].state.type.value != "CANCELLED" or _trainings()
            ):
                time.sleep(1)
            assert _child_runs(client, "pooled-cancelled")[0].state.type.value == "CANCELLED", logs()
            assert _trainings() == []  # no training process outlived its flow runs
    finally:
        stop_process(worker)
        stop_process(trainer)


def _trainings() -> list[int]:
    """Processes still running a training script that a pool's worker copied from the storage."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "train.py" in cmdline and "finetune-train-" in cwd:
            found.append(int(proc.name))
    return found


def _child_runs(client, run_name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tags = FlowRunFilterTags(all_=[f"finetune-run:{run_name}"])
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tags))
