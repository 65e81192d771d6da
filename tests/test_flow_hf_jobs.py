"""The tiny SFT with `backend: hf-jobs`, end to end through the same flow, against the
executing Jobs stand-in: the job really trains, pushes checkpoints and outputs to the
staging repo, and the rest of the lifecycle runs on what it fetched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.sft import sft
from tasks.core.spec import load_spec
from tasks.run.backends import JobRequest, get_backend
from tasks.run.monitor import Guard, monitor_job
from tests.helpers import EXAMPLES, wait_until
from tests.jobs_standin import STANDIN_TOKEN

pytestmark = pytest.mark.usefixtures("jobs_env")

TOKEN = STANDIN_TOKEN


def _spec(tmp_path: Path, name: str, **outputs):
    return load_spec(
        EXAMPLES / "sft-tiny-hf-jobs.yaml",
        {
            "name": name,
            "training": {"max_steps": 12, "save_steps": 5, "logging_steps": 2},
            "outputs": {"hub_repo": str(tmp_path / "published" / name), **outputs},
        },
    )


def _files_with(root: Path, needle: str) -> list[str]:
    return [
        str(p)
        for p in root.rglob("*")
        if p.is_file() and needle.encode() in p.read_bytes()  # binary files too: safetensors, sqlite, GGUF
    ]


def test_tiny_sft_trains_on_hf_jobs_and_finishes_the_lifecycle_locally(
    trains, prefect_server, jobs_standin, tmp_path, tiny_model_path, capfd
):
    summary = sft(spec=_spec(tmp_path, "hfjobs-e2e", gguf=["q8_0"]))
    assert summary.error is None, summary.stages
    assert all(s.status == "passed" for s in summary.stages), summary.stages
    assert jobs_standin.counts["create_job"] == 1

    job = summary.job
    assert job.backend == "hf-jobs" and job.state == "completed" and job.steps == job.max_steps == 12
    assert [p.step for p in job.losses] == [2, 4, 6, 8, 10, 12]  # every progress line came back through the log
    assert job.losses[-1].loss < job.losses[0].loss
    assert job.billed_s > 0 and job.job_id in jobs_standin.jobs

    # what the job pushed: checkpoints while training, then its outputs; inputs were uploaded first
    staged = set(jobs_standin.repos["models/standin-user/finetune-hfjobs-e2e"].commits[-1][1])
    assert {"train.py", "data/train.jsonl", "inputs/model/config.json", "train_result.json"} <= staged
    assert any(f.startswith("checkpoints/checkpoint-10/") for f in staged)
    assert any(f.startswith("model/") for f in staged) and any(f.startswith("trackio/") for f in staged)

    # fetched into the run folder, then converted, smoke-tested and published as for a local run
    run_dir = Path(summary.run_dir)
    for name in ("model/model.safetensors", "train_result.json", "logs/train.log", "job.json", "report.md"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "trackio").glob("*.db"))
    assert summary.gguf.files[0].passed and (tmp_path / "published" / "hfjobs-e2e" / "README.md").exists()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["inputs"]["bytes"] > 1e6 and plan["cost"]["upload_s"] > 0
    assert plan["script"]["config"]["model"] == "inputs/model"
    assert job.job_id in (run_dir / "report.md").read_text()

    # the token is nowhere: not in the run folder, the release, the job's spec, or what was printed
    out, err = capfd.readouterr()
    assert TOKEN not in out + err
    assert _files_with(tmp_path, TOKEN) == []
    body = json.loads(jobs_standin.received_bodies[-1])
    assert TOKEN not in json.dumps({k: v for k, v in body.items() if k != "secrets"})
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:  # the Prefect run carries the run's name, not a random one
        named = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["hfjobs-e2e"])))
    assert named and all(r.name == "hfjobs-e2e" for r in named)
    assert _prefect_database_holds("hfjobs-e2e")  # the scan reads the database this flow wrote...
    assert _prefect_database_holds(TOKEN) is False  # ...its logs, artifacts, parameters and states

    # the same run again re-attaches to the finished job instead of paying for another
    again = sft(spec=_spec(tmp_path, "hfjobs-e2e", gguf=["q8_0"]))
    assert again.error is None and again.job.job_id == job.job_id
    assert jobs_standin.counts["create_job"] == 1

    # a new job of the run (as after a crash) starts from the last checkpoint the first one pushed
    backend = get_backend("hf-jobs")
    request = JobRequest(
        run_name="hfjobs-e2e",
        run_dir=summary.run_dir,
        script=summary.plan.script,
        model_path=summary.plan.model_path,
        flavor="cpu-basic",
        timeout_s=600,
        attempt=2,
    )
    second = monitor_job(backend, backend.submit(request), Guard(max_usd=1, price_per_hour_usd=0.01), poll_s=0.5)
    assert second.state == "completed" and jobs_standin.counts["create_job"] == 2
    log = (run_dir / "logs" / "train.log").read_text()  # the new job's log; the first one's is kept beside it
    assert "resuming from" in log and "checkpoints/checkpoint-12" in log
    assert '"event": "start", "step": 12' in log  # it started where the first job stopped, not at step 0
    assert (run_dir / "logs" / f"train.{job.job_id}.log").exists()


def test_a_job_that_runs_out_of_memory_is_resubmitted_once_with_a_safer_plan(
    trains, prefect_server, jobs_standin, tmp_path, tiny_model_path
):
    jobs_standin.fail_next_jobs.append("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    summary = sft(spec=_spec(tmp_path, "hfjobs-oom", gguf=[]))
    assert summary.error is None, summary.stages
    assert jobs_standin.counts["create_job"] == 2
    assert summary.job.state == "completed"
    assert "ran out of memory" in summary.job.attempts[0]
    assert "micro-batch 8 -> 4 with accumulation 1 -> 2" in summary.job.attempts[0]
    config = json.loads(Path(summary.run_dir, "plan.json").read_text())["script"]["config"]["training"]
    assert config["per_device_train_batch_size"] == 8  # the plan is what was approved; the script changed
    assert "per_device_train_batch_size': 4" in Path(summary.run_dir, "train.py").read_text()
    assert Path(summary.run_dir, "train.attempt1.py").exists()
    assert "resubmitted once" in Path(summary.run_dir, "report.md").read_text()


def test_cancelling_the_flow_run_in_prefect_cancels_the_remote_job(
    trains, prefect_server, jobs_standin, tmp_path, tiny_model_path
):
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    spec = _spec(tmp_path, "hfjobs-cancel", gguf=[])
    spec = spec.model_copy(update={"training": {**spec.training, "max_steps": 100000, "save_steps": 100000}})
    errors: list[BaseException] = []
    flow_thread = threading.Thread(target=lambda: _run_collecting(spec, errors), daemon=True)
    flow_thread.start()
    run_dir = tmp_path / "runs" / "hfjobs-cancel"
    log = run_dir / "logs" / "train.log"
    wait_until(lambda: "FINETUNE_PROGRESS" in _text(log), 600, "the job to train", poll_s=0.5)
    handle = json.loads((run_dir / "job.json").read_text())
    assert jobs_standin.jobs[handle["job_id"]].stage == "RUNNING"
    with get_client(sync_client=True) as client:  # what the UI's and the CLI's cancel do
        client.set_flow_run_state(handle["flow_run_id"], Cancelling(), force=True)
    flow_thread.join(timeout=90)
    assert not flow_thread.is_alive()
    assert jobs_standin.jobs[handle["job_id"]].stage == "CANCELED"
    assert errors and "the flow run was cancelled" in str(errors[0])
    assert "| monitor | failed |" in (run_dir / "report.md").read_text()


def _run_collecting(spec, errors: list[BaseException]) -> None:
    try:
        sft(spec=spec)
    except BaseException as e:  # the flow ends with the job cancelled: recorded for the test
        errors.append(e)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _prefect_database_holds(needle: str) -> bool:
    """Whether the Prefect server's database (with its write-ahead log) contains `needle`,
    after the flow's logs have been flushed to it."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import get_current_settings

    APILogHandler().flush()
    url = get_current_settings().server.database.connection_url.get_secret_value()
    db = Path(url.split("///", 1)[1])
    assert db.exists(), url
    files = [p for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
    return any(needle.encode() in p.read_bytes() for p in files)
