"""The training stage: submit the job (or re-attach to it), follow it, retry once after an
out-of-memory failure, and bring the model in.

It runs as one Prefect task (`train` in tasks/stages.py) around the submit, monitor and
fetch tasks, because its result is what a re-run must not pay for twice: it is persisted
under a key made from the script, the data and the model, and a re-run with the same
inputs takes it from there. Checkpoints made from other inputs are set aside, never resumed.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect.exceptions import TerminationSignal

from tasks.atomic import write_text
from tasks.cache import file_hashes, key_of, model_fingerprint
from tasks.manifest import problems
from tasks.methods import method_definition
from tasks.models import Approval, CostEstimate, JobHandle, JobStatus, RunPlan, TrainedModel, TrainingScript
from tasks.money import usd
from tasks.run.backends import Backend, JobRequest, load_handle
from tasks.run.monitor import Guard
from tasks.run.resubmit import safer_training
from tasks.spec import RunSpec

# What a training leaves in the run folder; set aside together when the inputs change.
TRAINED_OUTPUTS = ("checkpoints", "model", "adapter", "train_result.json", "trackio", "gguf", "loss.png")


class TrainingFailed(RuntimeError):
    """Which part of training failed (submit_job, monitor, fetch_artifacts), with the job's
    account when it ran; the cause is the error the user is shown."""

    def __init__(self, stage: str, message: str, job: JobStatus | None = None, submitted: str | None = None) -> None:
        super().__init__(message)
        self.stage, self.job, self.submitted = stage, job, submitted

    def __reduce__(self) -> tuple[Any, ...]:  # Prefect persists failed results: keep the fields
        return (TrainingFailed, (self.stage, str(self), self.job, self.submitted))


def training_key(plan: RunPlan, backend: str) -> str:
    """What the trained model depends on: the script (hyper-parameters, method, paths), the
    data it reads, the base model, and where it runs."""
    run_dir = Path(plan.run_dir)
    return key_of(
        "train",
        plan.script.sha256,
        file_hashes(run_dir / "data" / "train.jsonl", run_dir / "data" / "heldout.jsonl"),
        model_fingerprint(plan.model_path),
        backend,
        plan.hardware.flavor,
    )


def trained_problems(trained: TrainedModel) -> list[str]:
    """Why a cached training result cannot be trusted any more (empty when it can)."""
    run_dir = Path(trained.handle.run_dir)
    found = [] if trained.result.manifest else ["no file record (an older result)"]
    return found + problems(run_dir, trained.result.manifest)


def set_aside_other_training(run_dir: Path, key: str) -> str | None:
    """Move the outputs of a training made from other inputs to superseded/, so that its
    checkpoints are not resumed and its model is not lost; returns what was done."""
    marker = run_dir / "training_key"
    earlier = marker.read_text().strip() if marker.exists() else None
    present = [name for name in TRAINED_OUTPUTS if (run_dir / name).exists()]
    note = None
    if earlier != key and present:
        dest = run_dir / "superseded" / f"{(earlier or 'unkeyed')[:24]}-{datetime.now():%Y%m%d-%H%M%S}"
        dest.mkdir(parents=True)
        for name in present:
            (run_dir / name).rename(dest / name)
        note = (
            f"the inputs changed since the last training of this run (spec, data, script or model): its "
            f"outputs ({', '.join(present)}) were moved to {dest}, and training starts afresh"
        )
    write_text(marker, key + "\n")
    return note


def backend_poll_s(backend: Backend) -> float:
    """How often the monitor polls: FINETUNE_POLL_S, else the backend's own default."""
    env = os.environ.get("FINETUNE_POLL_S")
    return float(env) if env else backend.poll_s


def job_timeout_s(cost: CostEstimate, max_hours: float) -> int:
    """The high end of the estimate plus a quarter and ten minutes, never past budget.max_hours."""
    return int(min(max_hours * 3600, cost.hours_high * 3600 * 1.25 + 600))


def stop_on_interrupt(backend: Backend, handle: JobHandle | None, run_name: str, say: Any = print) -> None:
    """An interrupted flow cancels the job it follows, wherever it runs (this machine, a Hub job, a
    pool's worker), rather than leave it training (and paying) unfollowed. Checkpoints stay. A
    flow killed outright cannot do this; its job runs on, and the next run of the spec takes it over."""
    if handle is None:
        return
    try:
        if backend.status(handle).state not in ("scheduling", "running"):
            return
        keeps = getattr(backend, "keeps_checkpoints", True)
        say(f"interrupted: cancelling job {handle.job_id}" + ("; its checkpoints stay" if keeps else ""))
        backend.cancel(handle)
        say(
            f"cancelled job {handle.job_id}; "
            + ("a re-run of the same spec resumes from its checkpoints" if keeps else "a re-run trains from the start")
        )
    except Exception as e:  # the interrupt still wins; say how to finish the cancel by hand
        say(f"interrupted, but job {handle.job_id} could not be cancelled ({e}): `python -m flows.cancel {run_name}`")


def job_request(
    spec: RunSpec, plan: RunPlan, script: TrainingScript, cost: CostEstimate, attempt: int, key: str | None
) -> JobRequest:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return JobRequest(
        run_name=plan.run_name,
        run_dir=plan.run_dir,
        script=script,
        model_path=plan.model_path,
        flavor=plan.hardware.flavor,
        timeout_s=job_timeout_s(cost, spec.budget.max_hours),
        push_model_to=script.config.get("push_model_to"),
        private=spec.outputs.private,
        attempt=attempt,
        flow_run_id=str(ctx.flow_run.id) if ctx and ctx.flow_run else None,
        training_key=key,
        baseline_path=plan.baseline_path,
        processes=plan.hardware.processes,
        pool=spec.pool if spec.backend == "prefect-pool" else None,
    )


def oom_retry(
    plan: RunPlan, script: TrainingScript, cost: CostEstimate, job: JobStatus, approval: Approval
) -> tuple[TrainingScript | None, str]:
    """A safer script for one more attempt after an out-of-memory failure, when one exists and
    the approved budget still covers a whole new run; else None and why not."""
    from tasks.stages import build_script_task

    changed = safer_training(script.config["training"])
    first = f"attempt 1 ran out of memory after {job.steps} steps ({usd(job.cost_usd)})"
    if changed is None:
        return None, f"{first}; nothing safer to try (micro-batch 1 with gradient checkpointing already)"
    training, what = changed
    if job.cost_usd + cost.usd_high > approval.max_usd:
        return None, (
            f"{first}; not resubmitted: {usd(job.cost_usd)} spent + up to {usd(cost.usd_high)} for another attempt "
            f"would pass max_usd {usd(approval.max_usd)}"
        )
    run_dir = Path(plan.run_dir)
    Path(script.path).replace(run_dir / "train.attempt1.py")  # kept for the record
    new_script = build_script_task.fn(method_definition(plan.method), {**script.config, "training": training}, run_dir)
    return new_script, f"{first}; resubmitted once with {what}, resuming from its last pushed checkpoint"


def train(
    spec: RunSpec,
    plan: RunPlan,
    cost: CostEstimate,
    approval: Approval | None,
    poll_s: float | None,
    key: str,
    say: Any = print,
) -> TrainedModel:
    """Submit, follow and fetch, as tasks; raises TrainingFailed naming the part that failed."""
    from tasks.run.backends import get_backend
    from tasks.stages import fetch_artifacts_task, monitor_task, submit_job_task

    if approval is None:  # only a cached result may be taken without an approval
        raise TrainingFailed("submit_job", "training was not approved, and no finished training has these inputs")
    backend = get_backend(spec.backend, spec.pool)
    note = set_aside_other_training(Path(plan.run_dir), key)
    if note:
        say(note)
    script, job, handle, submitted = plan.script, None, None, None
    attempts: list[str] = []
    spent = 0.0
    stage = "submit_job"
    try:
        for attempt in (1, 2):
            stage = "submit_job"
            handle = submit_job_task(spec.backend, job_request(spec, plan, script, cost, attempt, key))
            submitted = submitted or handle.url or handle.job_id
            stage = "monitor"
            guard = Guard(
                max_usd=approval.max_usd,
                price_per_hour_usd=cost.price_per_hour_usd,
                projection_margin=spec.budget.projection_margin,
                stall_s=spec.budget.stall_minutes * 60,
                startup_grace_s=cost.startup_s * 2,
                spent_before_usd=spent,
            )
            job = monitor_task(handle, plan.run_name, guard, poll_s or backend_poll_s(backend))
            if job.failure != "oom" or attempt == 2:
                break
            retry, why = oom_retry(plan, script, cost, job, approval)
            attempts.append(why)
            if retry is None:
                break
            script, spent = retry, job.cost_usd
        assert job is not None and handle is not None
        job = job.model_copy(update={"attempts": attempts}) if attempts else job
        if job.state != "completed":
            stage = "monitor"
        else:
            stage = "fetch_artifacts"
        result = fetch_artifacts_task(handle, job)
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, or SIGTERM (Prefect's): stop the job too
        stop_on_interrupt(backend, handle or load_handle(Path(plan.run_dir)), plan.run_name, say)
        raise
    except Exception as e:
        raise TrainingFailed(stage, f"{type(e).__name__}: {e}", job, submitted) from e
    return TrainedModel(training_key=key, handle=handle, job=job, result=result, submitted=submitted or "")
