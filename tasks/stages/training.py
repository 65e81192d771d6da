"""The training stages as Prefect tasks: check the account, submit the job, follow it (progress
artifacts, log lines, the budget guard), fetch what it made."""

from __future__ import annotations

import time

from prefect.cache_policies import NO_CACHE

from tasks.core.models import (
    JobHandle,
    JobResult,
    JobStatus,
    LossPoint,
)
from tasks.core.money import usd
from tasks.core.spec import BackendSettings
from tasks.run.backends import Account, JobRequest, get_backend
from tasks.run.fetch import fetch_artifacts
from tasks.run.monitor import Guard, Progress, monitor_job
from tasks.stages import artifacts
from tasks.stages.stage import say, stage


@stage(name="check_account", retries=0, cache_policy=NO_CACHE)
def check_account_task(backend_name: str, flavor: str, settings: BackendSettings | None = None) -> Account:
    """Credentials, namespace and the flavor's current price, before approval and upload."""
    account = get_backend(backend_name, settings).preflight(flavor)
    if account.namespace:
        price = f"{usd(account.price_per_hour_usd)}/h" if account.price_per_hour_usd is not None else "no price"
        say(f"{backend_name}: namespace {account.namespace}; {flavor} {price} from {account.price_source}")
    return account


@stage(name="submit_job", cache_policy=NO_CACHE)  # the backend retries network faults itself, idempotently
def submit_job_task(backend_name: str, request: JobRequest) -> JobHandle:
    backend = get_backend(backend_name, request.settings)
    existing = backend.find_live(request)
    if existing is not None:
        say(f"re-attached to {existing.job_id}, still alive from an earlier start of this run")
        return existing
    handle = backend.submit(request)
    where = f" ({handle.url})" if handle.url else ""
    say(f"submitted {handle.job_id}{where} on {handle.flavor}; log: {handle.log_path}")
    say(
        f"follow it with `python -m flows.status {request.run_name}`, cancel with `python -m flows.cancel {request.run_name}`"
    )
    return handle


class FlowCancelWatch:
    """A reason to stop when the surrounding flow run is being cancelled (a plain local run
    is not interrupted by Prefect's cancel, so the monitor looks for itself), checked at
    most every `every_s` seconds."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.checked_at = time.monotonic()

    def __call__(self) -> str | None:
        if time.monotonic() - self.checked_at < self.every_s:
            return None
        self.checked_at = time.monotonic()
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return None
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(ctx.flow_run.id).state
        except Exception:
            return None
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            return "the flow run was cancelled; the job was cancelled with it"
        return None


@stage(name="monitor", cache_policy=NO_CACHE)
def monitor_task(handle: JobHandle, run_name: str, guard: Guard, poll_s: float = 1.0) -> JobStatus:
    backend = get_backend(handle.backend)
    reporter = ProgressReporter(run_name)
    status = monitor_job(
        backend, handle, guard, poll_s=poll_s, on_update=reporter.update, stop_requested=FlowCancelWatch()
    )
    reporter.finish(status)
    say(f"job {status.state}: {status.detail.splitlines()[0] if status.detail else ''}")
    return status


class ProgressReporter:
    """Turns monitor updates into a Prefect progress artifact, a loss table and log lines."""

    TABLE_EVERY_S = 15.0  # table artifacts cannot be updated in place: each refresh is a new version

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.bar = artifacts.ProgressBar(artifacts.artifact_key("progress", run_name), "training progress")
        self.logged = 0
        self.state = ""
        self.table_at = time.monotonic()

    def update(self, p: Progress) -> None:
        self.bar.update(p.percent)
        extra = "".join(
            f" {k.removeprefix('train/')} {p.last_metrics[k]:.4f}"
            for k in ("train/rewards/margins", "train/rewards/accuracies", "train/reward")
            if k in p.last_metrics
        )
        money = f" | {usd(p.cost_usd)} so far" if p.cost_usd else ""
        if p.projected_usd is not None and p.cost_usd:
            money += f", ~{usd(p.projected_usd)} projected"
        eta = f" | ETA {p.eta_s / 60:.1f} min" if p.eta_s is not None else ""
        speed = f" | {p.tokens_per_s:.0f} tok/s" if p.tokens_per_s else ""
        for point in p.losses[self.logged :]:
            last = point is p.losses[-1]
            say(
                f"step {point.step}/{p.max_steps or '?'} loss {point.loss:.4f}"
                + (f"{extra}{speed}{eta}{money}" if last else "")
            )
        self.logged = len(p.losses)
        if p.state != self.state:
            self.state = p.state
            say(f"job {p.state}" + (f" ({p.billed_s:.0f} s billed)" if p.billed_s and p.cost_usd else ""))
        if time.monotonic() - self.table_at > self.TABLE_EVERY_S:
            self._table(p.losses)

    def _table(self, losses: list[LossPoint]) -> None:
        self.table_at = time.monotonic()
        artifacts.table(
            artifacts.artifact_key("loss", self.run_name),
            [{"step": p.step, "loss": round(p.loss, 5)} for p in losses],
            description="training loss (from the job's progress lines)",
        )

    def finish(self, status: JobStatus) -> None:
        if status.state == "completed":
            self.bar.update(100.0)
        self._table(status.losses)


@stage(name="fetch_artifacts", cache_policy=NO_CACHE)  # downloads are retried inside the backend
def fetch_artifacts_task(handle: JobHandle, status: JobStatus) -> JobResult:
    result = fetch_artifacts(get_backend(handle.backend), handle, status)
    say(f"model: {result.model_dir} ({result.size_mb} MB)")
    return result
