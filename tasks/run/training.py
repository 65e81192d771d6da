"""What training needs beyond the backends: the job request, its time limit and budget guard,
the out-of-memory retry decision, setting aside outputs made from other inputs (never resumed),
and cancelling the job when the flow is interrupted. The composition (submit, follow, fetch)
is `flows/run_training.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.models import Approval, CostEstimate, JobHandle, JobStatus, RunPlan, TrainingScript
from tasks.core.money import usd
from tasks.core.spec import RunSpec, backend_settings
from tasks.run.backends import Backend, JobRequest
from tasks.run.monitor import Guard
from tasks.run.resubmit import safer_training
from tasks.run.storage import RunStorage, set_aside_other_inputs

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


def set_aside_other_training(run_dir: Path, key: str) -> str | None:
    """Move the outputs of a training made from other inputs to superseded/, so that its
    checkpoints are not resumed and its model is not lost; returns what was done."""
    moved = set_aside_other_inputs(RunStorage(str(run_dir)), key, TRAINED_OUTPUTS)
    if moved is None:
        return None
    present, dest = moved
    return (
        f"the inputs changed since the last training of this run (spec, data, script or model): its "
        f"outputs ({', '.join(present)}) were moved to {dest}, and training starts afresh"
    )


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
        nodes=plan.hardware.nodes,
        gpus_per_node=plan.hardware.accelerator_count if plan.hardware.accelerator else 0,
        settings=backend_settings(spec),
    )


def oom_retry(
    script: TrainingScript, cost: CostEstimate, job: JobStatus, approval: Approval
) -> tuple[dict[str, Any] | None, str]:
    """Safer training arguments for one more attempt after an out-of-memory failure, when there
    are any and the approved budget still covers a whole new run; else None and why not."""
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
    return training, f"{first}; resubmitted once with {what}, resuming from its last pushed checkpoint"


def budget_guard(spec: RunSpec, cost: CostEstimate, approval: Approval, spent_before_usd: float) -> Guard:
    """What stops a job: the approved cap (counting earlier attempts), the projection, a stall."""
    return Guard(
        max_usd=approval.max_usd,
        price_per_hour_usd=cost.price_per_hour_usd,
        projection_margin=spec.budget.projection_margin,
        stall_s=spec.budget.stall_minutes * 60,
        startup_grace_s=cost.startup_s * 2,
        spent_before_usd=spent_before_usd,
    )


@dataclass
class Trail:
    """What a failure of training reports: the part that failed, the job so far, where it went."""

    handle: JobHandle | None = None
    job: JobStatus | None = None
    submitted: str | None = None

    @contextmanager
    def part(self, stage: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            raise TrainingFailed(stage, f"{type(e).__name__}: {e}", self.job, self.submitted) from e
