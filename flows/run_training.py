"""Training, composed of stages: submit the job (or re-attach to it), follow it, resubmit once
after it runs out of memory, and fetch what it made.

The composition is one Prefect task, `train`, because its result is what a re-run must not
pay for twice: it is persisted under a key made from the script, the data and the model
(`tasks/stages/cache.py:training_key`), and a re-run with the same inputs takes it from there.
Checkpoints made from other inputs are set aside, never resumed.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.exceptions import TerminationSignal

from tasks.core.methods import method_definition
from tasks.core.models import Approval, CostEstimate, JobHandle, JobStatus, RunPlan, TrainedModel, TrainingScript
from tasks.core.spec import RunSpec, backend_settings
from tasks.run.backends import get_backend, load_handle
from tasks.run.training import (
    Trail,
    TrainingFailed,
    backend_poll_s,
    budget_guard,
    job_request,
    oom_retry,
    set_aside_other_training,
    stop_on_interrupt,
)
from tasks.stages.cache import BY_KEY
from tasks.stages.planning import build_script_task
from tasks.stages.stage import say
from tasks.stages.training import fetch_artifacts_task, monitor_task, submit_job_task


@task(name="train", cache_policy=BY_KEY)
def train_task(
    spec: RunSpec,
    plan: RunPlan,
    cost: CostEstimate,
    approval: Approval | None,
    poll_s: float | None = None,
    cache_key: str = "",
) -> TrainedModel:
    """Submit, follow, fetch; persisted under its training key (`cache_key`)."""
    return train(spec, plan, cost, approval, poll_s, cache_key)


def train(
    spec: RunSpec, plan: RunPlan, cost: CostEstimate, approval: Approval | None, poll_s: float | None, key: str
) -> TrainedModel:
    """Raises TrainingFailed naming the part that failed; an interrupt cancels the job it follows."""
    if approval is None:  # only a cached result may be taken without an approval
        raise TrainingFailed("submit_job", "training was not approved, and no finished training has these inputs")
    backend = get_backend(spec.backend, backend_settings(spec))
    note = set_aside_other_training(Path(plan.run_dir), key)
    if note:
        say(note)
    trail = Trail()
    try:
        handle, job = attempts(spec, plan, cost, approval, poll_s or backend_poll_s(backend), key, trail)
        with trail.part("fetch_artifacts" if job.state == "completed" else "monitor"):
            result = fetch_artifacts_task(handle, job)
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, or SIGTERM (Prefect's): stop the job too
        stop_on_interrupt(backend, trail.handle or load_handle(Path(plan.run_dir)), plan.run_name, say)
        raise
    return TrainedModel(training_key=key, handle=handle, job=job, result=result, submitted=trail.submitted or "")


def attempts(
    spec: RunSpec, plan: RunPlan, cost: CostEstimate, approval: Approval, poll_s: float, key: str, trail: Trail
) -> tuple[JobHandle, JobStatus]:
    """One attempt, and a second with safer settings when the first ran out of memory."""
    script, spent, notes = plan.script, 0.0, []
    for attempt in (1, 2):
        with trail.part("submit_job"):
            trail.handle = submit_job_task(spec.backend, job_request(spec, plan, script, cost, attempt, key))
        trail.submitted = trail.submitted or trail.handle.url or trail.handle.job_id
        with trail.part("monitor"):
            guard = budget_guard(spec, cost, approval, spent)
            trail.job = monitor_task(trail.handle, plan.run_name, guard, poll_s)
        if trail.job.failure != "oom" or attempt == 2:
            break
        with trail.part("monitor"):
            retry, why = safer_script(plan, script, cost, trail.job, approval)
        notes.append(why)
        if retry is None:
            break
        script, spent = retry, trail.job.cost_usd
    assert trail.handle is not None and trail.job is not None
    if notes:
        trail.job = trail.job.model_copy(update={"attempts": notes})
    return trail.handle, trail.job


def safer_script(
    plan: RunPlan, script: TrainingScript, cost: CostEstimate, job: JobStatus, approval: Approval
) -> tuple[TrainingScript | None, str]:
    """The script rebuilt with safer settings after running out of memory (the first kept as
    train.attempt1.py), or None and why not."""
    training, why = oom_retry(script, cost, job, approval)
    if training is None:
        return None, why
    run_dir = Path(plan.run_dir)
    Path(script.path).replace(run_dir / "train.attempt1.py")  # kept for the record
    method = method_definition(plan.method)
    return build_script_task(method, {**script.config, "training": training}, run_dir), why
