"""prefect.yaml as a user deploys it: `prefect deploy --all` against a real server creates every
deployment with its typed parameters and schedule (a spec the JSON schema refuses fails here,
not in front of a user); a process worker on the pool runs the sft deployment, whose training
step (`backend: prefect-pool`) goes to the training pool's own worker and comes back; and a
run cancelled while its pool trains leaves no training process behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.core.methods import METHODS
from tests.helpers import QUICK_SFT, REPO, start_process, stop_process


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_prefect_deploy_all_creates_every_deployment_and_workers_train_a_run_through_the_pool(
    trains, prefect_server, tmp_path
):
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
    assert {f"{m}/{m}" for m in METHODS} | {"recipe/sft-then-grpo", "finetune-train/train"} <= set(found)
    assert found["finetune-train/train"].work_pool_name == "finetune-train"
    for entry in declared:
        if entry["name"] == "train":  # the pool's training step: run below
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
    assert "description" in spec_schema["conversion"] and spec_schema["method"]["enum"] == list(METHODS)
    # workers started as docs/backends.md starts them: one for the lifecycle flows, one for the training
    # pool. Two runs of the sft deployment go through the pool at once, with shared storage in a
    # local folder: one trains the tiny SFT as 2 processes (the launch every backend uses) and comes
    # back; the other is cancelled while it trains, and its training stops with it.
    local_log, train_log = tmp_path / "worker.log", tmp_path / "train-worker.log"
    worker = start_process([*prefect, "worker", "start", "--pool", "finetune-local", "--limit", "2"], local_log)
    trainer = start_process([*prefect, "worker", "start", "--pool", "finetune-train"], train_log)
    storage = tmp_path / "shared"
    pooled = {**QUICK_SFT, "backend": "prefect-pool", "pool": {"storage": str(storage)}}
    logs = lambda: local_log.read_text()[-2000:] + train_log.read_text()[-2000:]  # noqa: E731
    try:
        from deployments.client import connect

        with connect() as api, get_client(sync_client=True) as client:
            assert api.find_deployment("sft").work_pool == "finetune-local"
            two = {**pooled, "distributed": {"processes": 2}, "evaluation": {"generations": 1}, "name": "pooled"}
            slow = {**pooled, "training": {**QUICK_SFT["training"], "max_steps": 2000}, "name": "pooled-cancelled"}
            trained = api.start_run("sft/sft", two).flow_run_id
            parent = api.start_run("sft/sft", slow).flow_run_id

            where = storage / "pooled-cancelled" / "attempt-1" / "worker"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # until the pool's worker is training it
                children = _child_runs(client, "pooled-cancelled")
                if children and children[0].state.type.value == "RUNNING" and where.exists():
                    if _trainings(where.read_text().split()[1]):
                        break
                time.sleep(1)
            else:
                raise AssertionError(logs())
            work = where.read_text().split()[1]
            api.cancel(parent)
            assert api.wait(parent, timeout_s=120).state == "CANCELLED", logs()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                _child_runs(client, "pooled-cancelled")[0].state.type.value != "CANCELLED" or _trainings(work)
            ):
                time.sleep(1)
            assert _child_runs(client, "pooled-cancelled")[0].state.type.value == "CANCELLED", logs()
            assert _trainings(work) == []  # no training process outlived its flow runs

            done = api.wait(trained, timeout_s=420)
            assert done.state == "COMPLETED", logs()
            assert done.name == "pooled"
            (child,) = _child_runs(client, "pooled")
            assert child.name == "pooled-train-1" and child.state.type.value == "COMPLETED"
            assert child.work_pool_name == "finetune-train"
            outputs = storage / "pooled" / "attempt-1" / "outputs"
            assert (outputs / "train_result.json").exists() and list((outputs / "model").glob("*.safetensors"))
            _two_processes_trained(Path(os.environ["FINETUNE_RUNS_DIR"]) / "pooled")
            assert _trainings("") == []
    finally:
        stop_process(worker)
        stop_process(trainer)


def _two_processes_trained(run_dir: Path) -> None:
    """The tiny SFT as 2 data-parallel processes over gloo on this CPU, through the generated
    `accelerate launch`: both trained every step on their own rows, and the saved model loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.models import RunPlan

    launch = yaml.safe_load((run_dir / "accelerate.yaml").read_text())
    assert launch["num_processes"] == 2 and launch["use_cpu"] is True
    log = (run_dir / "logs" / "train.log").read_text()  # mirrored from the storage while it ran
    assert "accelerate launch --config_file accelerate.yaml train.py" in log
    plan = RunPlan.model_validate_json((run_dir / "plan.json").read_text())
    m, a = plan.hardware.micro_batch, plan.hardware.accumulation
    assert (plan.hardware.processes, plan.hardware.strategy, plan.hardware.global_batch) == (2, "ddp", 8)
    for rank in (0, 1):
        assert f"process {rank} of 2 trained 6 optimizer steps of {m} x {a} rows" in log
    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["measured"]["processes"] == 2 and result["measured"]["global_batch"] == 2 * m * a == 8
    # an epoch is ceil(rows / 8) optimizer steps of both processes' rows (one process alone: of 4)
    assert round(6 / result["metrics"]["epoch"]) == math.ceil(plan.dataset.train_rows / 8)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # fetched from the storage
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = tokenizer("1+2=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    report = (run_dir / "report.md").read_text()
    assert "job: prefect-pool" in report and "pooled-train-1" in report
    assert "2 processes (ddp, world size 2, global batch 8)" in report and "tokens per second per process" in report


def _trainings(work: str) -> list[int]:
    """Processes still running a training script that a pool's worker copied from the storage (into `work`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "train.py" in cmdline and "finetune-train-" in cwd and cwd.startswith(work):
            found.append(int(proc.name))
    return found


def _child_runs(client, run_name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tags = FlowRunFilterTags(all_=[f"finetune-run:{run_name}"])
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tags))
