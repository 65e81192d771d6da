"""`backend: prefect-pool` for real: a Prefect server, the training deployment of prefect.yaml on
a process work pool, a worker started as the README starts it, and runs of the served sft
deployment whose training step goes through the pool, with shared storage in a local folder.
One run trains (as 2 processes, the launch every backend uses) and comes back; another is
cancelled while it trains, and its training stops with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, process_env, start_process, stop_process
from tests.test_doors import QUICK_SFT

pytestmark = pytest.mark.slow


def _cli(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def _trainings_of(storage: Path) -> list[int]:
    """Processes still running a script copied from this storage (the worker runs it from a temp folder)."""
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

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"finetune-run:{run_name}"]))
    )


def test_a_run_trains_through_a_process_work_pool_and_a_cancelled_run_leaves_no_training_behind(served, tmp_path):
    from prefect import get_client

    from deployments.client import connect

    _cli("work-pool", "create", "--type", "process", "finetune-train", "--overwrite")
    _cli("--no-prompt", "deploy", "--name", "train")
    worker_log = tmp_path / "worker.log"
    worker = start_process([sys.executable, "-m", "prefect", "worker", "start", "--pool", "finetune-train"], worker_log)
    storage = tmp_path / "shared"
    pooled = {**QUICK_SFT, "backend": "prefect-pool", "pool": {"storage": str(storage)}}
    try:
        with connect() as api, get_client(sync_client=True) as client:
            two = {**pooled, "distributed": {"processes": 2}, "name": "pooled"}
            done = api.wait(api.start_run("sft", two).flow_run_id, timeout_s=420)
            assert done.state == "COMPLETED", worker_log.read_text()[-3000:]
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
            parent = api.start_run("sft", slow).flow_run_id
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:  # until the pool's worker is training it
                children = _child_runs(client, "pooled-cancelled")
                if children and children[0].state.type.value == "RUNNING" and _trainings_of(storage):
                    break
                time.sleep(1)
            else:
                raise AssertionError(worker_log.read_text()[-3000:])
            api.cancel(parent)
            cancelled = api.wait(parent, timeout_s=120)
            assert cancelled.state == "CANCELLED"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                _child_runs(client, "pooled-cancelled")[0].state.type.value != "CANCELLED" or _trainings_of(storage)
            ):
                time.sleep(1)
            assert _child_runs(client, "pooled-cancelled")[0].state.type.value == "CANCELLED"
            assert _trainings_of(storage) == []  # no training process outlived its flow runs
    finally:
        stop_process(worker)
