"""Hugging Face Jobs through the real huggingface_hub client, against an executing stand-in
of the Jobs and Hub API (tests/jobs_jobs_standin.py): each job's command really runs, as a local
process, so submission, upload, logs, progress, checkpoints, push and fetch are exercised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.run.backends import BackendError, get_backend, load_handle
from tasks.run.backends.hf_jobs import HfJobsBackend
from tasks.run.monitor import Guard, monitor_job
from tests.helpers import job_request, wait_until
from tests.jobs_standin import STANDIN_TOKEN

pytestmark = pytest.mark.usefixtures("jobs_env")

TOKEN = STANDIN_TOKEN


def _backend() -> HfJobsBackend:
    return HfJobsBackend(retry_delays_s=(0.1, 0.2, 0.4))


PROGRESS = """
import json, sys, time
for step in range(1, {steps} + 1):
    time.sleep({sleep})
    print("FINETUNE_PROGRESS " + json.dumps({{"step": step, "total": {total}, "loss": 2.0 / step,
          "metrics": {{"train/loss": 2.0 / step}}, "elapsed_s": step * {sleep}}}), flush=True)
"""


def test_a_job_runs_remotely_and_its_progress_comes_back_through_the_log(jobs_standin, tmp_path):
    backend = _backend()
    request = job_request(tmp_path, PROGRESS.format(steps=4, total=4, sleep=0.05) + "print('done')\n", name="job-test")
    handle = backend.submit(request)
    assert load_handle(Path(request.run_dir)) == handle  # another process can find it
    assert handle.staging_repo == "standin-user/finetune-job-test" and handle.namespace == "standin-user"
    status = monitor_job(backend, handle, Guard(max_usd=1.0, price_per_hour_usd=0.6), poll_s=0.2)
    assert status.state == "completed", status.detail
    assert status.steps == 4 and status.max_steps == 4
    assert [p.loss for p in status.losses] == [2.0, 1.0, 2.0 / 3, 0.5]
    assert status.billed_s > 0 and status.cost_usd > 0
    assert "done" in Path(handle.log_path).read_text()  # the job's log is kept in the run folder
    # the script and data went to a private staging repo; the job's request carried the token as a secret
    repo = jobs_standin.repos["models/standin-user/finetune-job-test"]
    assert repo.private and {"train.py", "data/train.jsonl"} <= set(repo.commits[-1][1])
    body = json.loads(jobs_standin.received_bodies[-1])
    assert body["secrets"] == {"HF_TOKEN": TOKEN}
    assert TOKEN not in json.dumps(body["environment"]) and TOKEN not in json.dumps(body["command"])
    assert body["flavor"] == "cpu-basic" and body["timeoutSeconds"] == 120
    assert body["labels"]["finetune-run"] == "job-test" and len(body["labels"]["finetune-key"]) == 16
    assert body["dockerImage"].startswith("ghcr.io/astral-sh/uv")


@pytest.mark.parametrize("how", ["environment", "constants"])
def test_hf_debug_is_refused_while_a_token_is_in_use(jobs_standin, monkeypatch, tmp_path, how):
    import huggingface_hub.constants as constants

    from tasks.core.hub_access import DebugSwitchRefused
    from tasks.export.hub import publish_to_hub

    if how == "environment":
        monkeypatch.setenv("HF_DEBUG", "1")  # curl dumps of every request, headers and body
    else:
        monkeypatch.setattr(constants, "HF_DEBUG", True)
    jobs_standin.reset_counters()
    with pytest.raises(DebugSwitchRefused, match="HF_DEBUG"):
        _backend().preflight("cpu-basic")
    with pytest.raises(DebugSwitchRefused, match="HF_DEBUG"):
        _backend().submit(job_request(tmp_path, "print('hi')\n", name="debug-run"))
    with pytest.raises(DebugSwitchRefused, match="HF_DEBUG"):
        publish_to_hub(tmp_path, "standin-user/debug", True, TOKEN, "publish")
    assert jobs_standin.log == [], "nothing was sent"


def test_a_failed_job_reports_its_state_and_the_end_of_its_log(tmp_path):
    backend = _backend()
    request = job_request(tmp_path, "print('loading'); raise SystemExit('ValueError: dataset column missing')\n")
    status = monitor_job(backend, backend.submit(request), Guard(max_usd=1.0, price_per_hour_usd=0.6), poll_s=0.2)
    assert status.state == "failed" and status.failure == "error"
    assert "exit code 1" in status.detail and "dataset column missing" in status.detail


def test_out_of_memory_is_recognised_from_the_log(tmp_path):
    backend = _backend()
    request = job_request(
        tmp_path, "raise SystemExit('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate')\n"
    )
    status = monitor_job(backend, backend.submit(request), Guard(max_usd=1.0, price_per_hour_usd=0.6), poll_s=0.2)
    assert status.state == "failed" and status.failure == "oom"


def test_the_budget_guard_cancels_a_job_before_it_passes_max_usd(jobs_standin, tmp_path):
    backend = _backend()
    handle = backend.submit(job_request(tmp_path, "import time\ntime.sleep(120)\n"))
    # $3600/h is $1 per billed second: with max_usd $2.5 the guard must stop it after ~2 s
    status = monitor_job(backend, handle, Guard(max_usd=2.5, price_per_hour_usd=3600.0), poll_s=0.25)
    assert status.state == "cancelled" and status.failure == "budget"
    assert "next poll would pass max_usd $2.50" in status.detail
    assert jobs_standin.jobs[handle.job_id].stage == "CANCELED"


def test_the_projection_stops_a_run_that_would_cost_too_much(jobs_standin, tmp_path):
    backend = _backend()
    body = PROGRESS.format(steps=1000, total=1000, sleep=0.1)
    handle = backend.submit(job_request(tmp_path, body))
    # ~0.1 s per step for 1000 steps at $36/h is ~$1 in all: far over max_usd $0.30
    guard = Guard(max_usd=0.30, price_per_hour_usd=36.0, projection_margin=0.1)
    status = monitor_job(backend, handle, guard, poll_s=0.3)
    assert status.state == "cancelled" and status.failure == "projection", status.detail
    assert "at the measured speed" in status.detail and status.cost_usd < 0.30
    assert jobs_standin.jobs[handle.job_id].stage == "CANCELED"


def test_a_job_that_prints_nothing_is_cancelled_as_stuck(jobs_standin, tmp_path):
    backend = _backend()
    handle = backend.submit(job_request(tmp_path, "import time\ntime.sleep(120)\n"))
    status = monitor_job(backend, handle, Guard(max_usd=5.0, price_per_hour_usd=0.01, stall_s=1.5), poll_s=0.25)
    assert status.state == "cancelled" and status.failure == "stalled"
    assert "no progress line" in status.detail
    assert jobs_standin.jobs[handle.job_id].stage == "CANCELED"


def test_a_cancel_request_cancels_the_remote_job(jobs_standin, tmp_path):
    backend = _backend()
    handle = backend.submit(job_request(tmp_path, "import time\ntime.sleep(120)\n"))
    asked = iter([None, None, "the flow run was cancelled"])
    status = monitor_job(
        backend, handle, Guard(max_usd=5.0, price_per_hour_usd=0.01), poll_s=0.2, stop_requested=lambda: next(asked)
    )
    assert status.state == "cancelled" and status.failure == "flow cancelled"
    assert jobs_standin.jobs[handle.job_id].stage == "CANCELED"


def test_the_cancellation_hook_finds_the_job_of_a_flow_run(jobs_standin, tmp_path):
    from types import SimpleNamespace

    from tasks.run.jobs import cancel_job_of_flow_run

    backend = _backend()
    request = job_request(tmp_path, "import time\ntime.sleep(120)\n").model_copy(update={"flow_run_id": "fr-123"})
    handle = backend.submit(request)
    cancel_job_of_flow_run(None, SimpleNamespace(id="fr-other"), None)
    assert jobs_standin.jobs[handle.job_id].stage in ("SCHEDULING", "RUNNING")
    cancel_job_of_flow_run(None, SimpleNamespace(id="fr-123"), None)
    wait_until(lambda: jobs_standin.jobs[handle.job_id].stage == "CANCELED", 120, "the job to be cancelled")
    assert jobs_standin.jobs[handle.job_id].stage == "CANCELED"


def test_a_dropped_submission_is_found_by_its_label_and_never_sent_twice(jobs_standin, tmp_path):
    backend = _backend()
    request = job_request(tmp_path, PROGRESS.format(steps=2, total=2, sleep=0.05))
    jobs_standin.drop_next("POST /api/jobs/", after_handling=True)  # the job is created, the answer lost
    handle = backend.submit(request)
    assert jobs_standin.counts["create_job"] == 1
    assert handle.job_id in jobs_standin.jobs
    # submitting the same run again re-attaches instead of starting a second job
    assert backend.submit(request).job_id == handle.job_id
    assert jobs_standin.counts["create_job"] == 1
    assert monitor_job(backend, handle, Guard(max_usd=1, price_per_hour_usd=0.6), poll_s=0.2).state == "completed"


def test_dropped_log_streams_are_retried_and_no_line_is_lost(jobs_standin, tmp_path):
    backend = _backend()
    handle = backend.submit(job_request(tmp_path, PROGRESS.format(steps=5, total=5, sleep=0.1)))
    jobs_standin.drop_next("/logs", times=3)
    jobs_standin.fail_next(f"/api/jobs/standin-user/{handle.job_id}", status=503, times=2)
    status = monitor_job(backend, handle, Guard(max_usd=1, price_per_hour_usd=0.6), poll_s=0.2)
    assert status.state == "completed" and [p.step for p in status.losses] == [1, 2, 3, 4, 5]


def test_a_refused_token_fails_before_anything_is_uploaded(jobs_standin, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(BackendError, match="HTTP 401.*invalid or expired") as err:
        _backend().preflight("cpu-basic")
    assert "hf_wrong" not in str(err.value)
    from tasks.core import hub_access

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub_access, "stored_token", lambda: None)  # no `hf auth login` token either
    monkeypatch.setenv("FINETUNE_HF_TOKEN_BLOCK", "no-such-block")
    with pytest.raises(BackendError, match="no Hugging Face token"):
        _backend().preflight("cpu-basic")
    assert jobs_standin.counts["create_repo"] == 0 and jobs_standin.counts["create_job"] == 0


def test_a_namespace_that_cannot_pay_is_told_so_before_any_upload(jobs_standin):
    jobs_standin.can_pay = False
    with pytest.raises(BackendError, match="no payment method or credits"):
        _backend().preflight("cpu-basic")
    assert jobs_standin.counts["create_repo"] == 0


def test_prices_come_from_the_jobs_hardware_list_with_the_catalogue_as_fallback(jobs_standin):
    account = _backend().preflight("t4-small")
    assert account.namespace == "standin-user"
    assert account.price_per_hour_usd == pytest.approx(0.006667 * 60)
    assert account.price_source == "list_jobs_hardware()"
    jobs_standin.fail_next("/api/jobs/hardware", status=500)
    fallback = _backend().preflight("t4-small")
    assert fallback.price_per_hour_usd is None and fallback.price_source.startswith("catalogue")


def test_an_endpoint_that_is_down_gives_a_clear_error(monkeypatch, waits):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(BackendError, match=r"failed after 4 attempts \(http://127.0.0.1:9\)"):
        _backend().preflight("cpu-basic")
    assert sum(waits) < 30  # the error comes after the retry schedule's waits, not a long backoff


def test_the_registry_is_the_only_place_that_knows_backends():
    from typing import get_args

    from tasks.core.spec import Backend, runs_on_this_machine

    assert get_backend("local").on_this_machine and not get_backend("hf-jobs").on_this_machine
    for name in get_args(Backend):  # the planner's view of where a backend trains is each backend's own
        assert runs_on_this_machine(name) == get_backend(name).on_this_machine
    assert get_backend("hf-jobs").model_reference("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    for part in ("lifecycle.py", "planning.py", "run_training.py"):  # the lifecycle's compositions
        pipeline = (Path(__file__).parent.parent / "flows" / part).read_text()
        assert "backend ==" not in pipeline and '"hf-jobs"' not in pipeline and '"local"' not in pipeline


def test_checkpoints_of_other_inputs_are_set_aside_in_the_staging_repo_history(jobs_standin):
    from tasks.core.hub_access import make_api

    api, repo = make_api(TOKEN), "standin-user/finetune-changed-inputs"
    api.create_repo(repo, private=True, exist_ok=True)
    api.upload_file(path_or_fileobj=b"key-a\n", path_in_repo="training_key", repo_id=repo)
    api.upload_file(path_or_fileobj=b"ckpt", path_in_repo="checkpoints/checkpoint-4/model.safetensors", repo_id=repo)
    backend = _backend()
    backend._set_aside_other_checkpoints(api, repo, "key-a", TOKEN)  # same inputs: resumed from
    assert "checkpoints/checkpoint-4/model.safetensors" in api.list_repo_files(repo)
    backend._set_aside_other_checkpoints(api, repo, "key-b", TOKEN)  # other inputs: never resumed
    assert not [f for f in api.list_repo_files(repo) if f.startswith("checkpoints/")]
    earlier = [files for _, files in jobs_standin.repos[f"models/{repo}"].commits[:-1]]
    assert any("checkpoints/checkpoint-4/model.safetensors" in f for f in earlier)  # kept in the history


def test_a_recipes_baseline_folder_and_the_task_data_travel_with_the_job(jobs_standin, tmp_path):
    backend = _backend()
    request = job_request(tmp_path, "print('done')\n", name="baseline-upload")
    baseline = tmp_path / "base-model"
    baseline.mkdir()
    (baseline / "config.json").write_text('{"model_type": "qwen2"}')
    task_data = Path(request.run_dir) / "evals" / "answer_form" / "test-0.jsonl"
    task_data.parent.mkdir(parents=True)
    task_data.write_text('{"question": "What is 1 + 1?"}\n')
    request = request.model_copy(update={"baseline_path": str(baseline)})
    planned = backend.planned_inputs(Path(request.run_dir), request.model_path, str(baseline))
    assert any("baseline model folder" in item for item in planned.items)
    assert any("task evaluation data (1 files)" in item for item in planned.items)
    assert backend.model_reference(str(baseline), slot="baseline") == "inputs/baseline"
    handle = backend.submit(request)
    status = monitor_job(backend, handle, Guard(max_usd=1.0, price_per_hour_usd=0.6), poll_s=0.2)
    assert status.state == "completed", status.detail
    repo = jobs_standin.repos["models/standin-user/finetune-baseline-upload"]
    uploaded = {path for _, files in repo.commits for path in files}
    assert {"inputs/baseline/config.json", "evals/answer_form/test-0.jsonl", "train.py"} <= uploaded


def test_the_files_the_script_imports_travel_with_the_job(jobs_standin, tmp_path):
    """train.py imports its siblings and the GRPO reward modules from its own folder: every file
    the builder writes is uploaded (and listed for the pool), fetched by the job, and imports there."""
    from tasks.core.methods import GRPO
    from tasks.plan.rewards import resolve_rewards
    from tasks.plan.script import build_script
    from tasks.run.backends.base import job_inputs

    user = tmp_path / "my_rewards.py"
    user.write_text("def brevity(completions, **kw):\n    return [0.0] * len(completions)\n")
    rewards = [src.model_dump() for _, src in resolve_rewards(["exact_answer", f"{user}:brevity"])]
    request = job_request(tmp_path, "print('placeholder')\n", name="script-files")
    run_dir = Path(request.run_dir)
    config = {"trainer": "GRPOTrainer", "config_class": "GRPOConfig", "method": "grpo", "seed": 0, "training": {}}
    script = build_script(GRPO, {**config, "rewards": rewards}, run_dir)
    assert script.files == [
        "train.py",
        "finetune_eval.py",
        "finetune_callbacks.py",
        "finetune_vision.py",
        "finetune_attention.py",
        "finetune_probe.py",
        "finetune_rewards/__init__.py",
        "finetune_rewards/rewards.py",
        "finetune_rewards/my_rewards.py",
    ]
    assert set(script.files) <= {name for _, name in job_inputs(run_dir, request.model_path)[0]}  # prefect-pool
    (run_dir / "train.py").write_text(
        "import finetune_callbacks, finetune_eval, finetune_vision\n"
        "from finetune_rewards.my_rewards import brevity\n"
        "from finetune_rewards.rewards import exact_answer\n"
        "print('imported', brevity.__name__, exact_answer.__name__, finetune_eval.Evaluation.__name__)\n"
    )
    handle = _backend().submit(request.model_copy(update={"script": script}))
    status = monitor_job(_backend(), handle, Guard(max_usd=1.0, price_per_hour_usd=0.6), poll_s=0.2)
    assert status.state == "completed", status.detail
    assert "imported brevity exact_answer Evaluation" in Path(handle.log_path).read_text()
    repo = jobs_standin.repos["models/standin-user/finetune-script-files"]
    assert set(script.files) <= {path for _, files in repo.commits for path in files}
