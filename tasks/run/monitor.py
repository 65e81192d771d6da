"""Follow a running job until it ends, with its progress, metrics and budget guard.

The same for every backend: the job's state and billed seconds come from
`backend.status`, its log from `backend.read_log`, and progress, loss and the method's
metrics from the structured progress lines the script prints (tasks/run/progress_line.py).
Each poll produces a `Progress` that the Prefect wrapper turns into a progress artifact,
a loss table and log lines.

The guard cancels the job, keeping its last checkpoint, when
- the cost so far would pass max_usd before the next poll,
- the projection (cost so far + remaining steps at the measured rate) passes max_usd by
  more than the spec's margin,
- no progress line arrived for `stall_s` (after a start-up allowance), or
- the caller asks (a cancelled flow run).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.core.models import JobHandle, JobSnapshot, JobStatus, LossPoint
from tasks.core.money import usd
from tasks.run.backends.base import Backend, BackendError
from tasks.run.progress_line import PREFIX, ProgressLine, parse_progress_line

OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
TERMINAL = ("completed", "failed", "cancelled")


class Guard(BaseModel):
    """What the monitor enforces while the job runs."""

    model_config = ConfigDict(frozen=True)

    max_usd: float
    price_per_hour_usd: float
    projection_margin: float = 0.10
    stall_s: float | None = 1800.0
    startup_grace_s: float = 0.0
    spent_before_usd: float = 0.0  # earlier attempts of the same run count against the same budget


class Progress(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: str = "running"
    step: int
    max_steps: int | None
    epoch: float | None = None
    elapsed_s: float
    billed_s: float = 0.0
    cost_usd: float
    projected_usd: float | None = None
    eta_s: float | None = None
    tokens_per_s: float | None = None
    losses: list[LossPoint]
    first_metrics: dict[str, float]
    last_metrics: dict[str, float]

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.max_steps if self.max_steps else 0.0


def read_trackio_metrics(trackio_dir: Path, project: str, run_name: str) -> list[dict[str, float]]:
    """Every logged metrics row of one run from Trackio's local store, oldest first."""
    db = trackio_dir / f"{project}.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            rows = conn.execute("SELECT metrics FROM metrics WHERE run_name = ? ORDER BY id", (run_name,)).fetchall()
    except sqlite3.OperationalError:  # created but not yet initialised, or briefly locked
        return []
    out = []
    for (blob,) in rows:
        try:
            values = json.loads(blob)
        except (TypeError, ValueError):
            continue
        out.append({k: float(v) for k, v in values.items() if isinstance(v, int | float)})
    return out


def steps_per_s(records: list[ProgressLine]) -> float | None:
    """The job's measured speed between its first and last logged steps."""
    logged = [r for r in records if r.event == "log" and r.step > 0]
    if len(logged) < 2 or logged[-1].elapsed_s <= logged[0].elapsed_s or logged[-1].step <= logged[0].step:
        return None
    return (logged[-1].step - logged[0].step) / (logged[-1].elapsed_s - logged[0].elapsed_s)


_NOISE = re.compile(r"^\s*(\{'|\d+%\||[\w .]+:\s+\d+%\|)")  # trainer dicts, progress bars


def readable_tail(text: str, keep: int = 12) -> str:
    """The end of a log as a person reads it: progress records, trainer metric dicts and
    progress bars left out (the curve is in the report), each line at most 300 characters."""
    lines = []
    for line in text.replace("\r", "\n").splitlines():
        if not line.strip() or PREFIX in line or _NOISE.match(line):
            continue
        lines.append(line if len(line) <= 300 else line[:297] + "...")
    return "\n".join(lines[-keep:])


def curve(records: list[ProgressLine]) -> list[LossPoint]:
    """The loss per optimizer step, each step once (a step logged twice keeps its last value)."""
    by_step = {r.step: r.loss for r in records if r.loss is not None}
    return [LossPoint(step=step, loss=loss) for step, loss in sorted(by_step.items())]


def summarise(records: list[ProgressLine], snap: JobSnapshot, guard: Guard, elapsed_s: float) -> Progress:
    training = [r for r in records if r.loss is not None]
    last = records[-1] if records else None
    total = next((r.total for r in reversed(records) if r.total), None)
    step = last.step if last else 0
    cost = guard.spent_before_usd + snap.billed_s / 3600 * guard.price_per_hour_usd
    rate = steps_per_s(records)
    eta = (total - step) / rate if rate and total and snap.state not in TERMINAL else None
    projected = cost + eta / 3600 * guard.price_per_hour_usd if eta is not None else None
    tokens = next((r.tokens_per_s for r in reversed(records) if r.tokens_per_s), None)
    return Progress(
        state=snap.state,
        step=step,
        max_steps=total,
        epoch=last.epoch if last else None,
        elapsed_s=elapsed_s,
        billed_s=snap.billed_s,
        cost_usd=cost,
        projected_usd=projected,
        eta_s=eta,
        tokens_per_s=tokens,
        losses=curve(training),
        first_metrics=training[0].metrics if training else {},
        last_metrics=training[-1].metrics if training else {},
    )


def guard_reason(p: Progress, guard: Guard, poll_s: float, quiet_s: float | None) -> tuple[str, str] | None:
    """(failure kind, why) when the guard must stop the job now."""
    price = guard.price_per_hour_usd
    if price > 0 and p.cost_usd + poll_s / 3600 * price > guard.max_usd:
        return "budget", (
            f"budget guard: {usd(p.cost_usd)} spent after {p.billed_s / 60:.1f} billed min at {usd(price)}/h; "
            f"the next poll would pass max_usd {usd(guard.max_usd)}"
        )
    if price > 0 and p.projected_usd is not None and p.projected_usd > guard.max_usd * (1 + guard.projection_margin):
        return "projection", (
            f"budget guard: at the measured speed the run would cost {usd(p.projected_usd)} "
            f"(step {p.step}/{p.max_steps}, {usd(p.cost_usd)} so far), more than max_usd {usd(guard.max_usd)} "
            f"+ {guard.projection_margin:.0%}"
        )
    if guard.stall_s is not None and quiet_s is not None and quiet_s > guard.stall_s:
        return "stalled", (
            f"stuck: no progress line from the job for {quiet_s / 60:.1f} min (limit {guard.stall_s / 60:.1f} min, "
            "budget.stall_minutes)"
        )
    return None


def monitor_job(
    backend: Backend,
    handle: JobHandle,
    guard: Guard,
    poll_s: float = 1.0,
    on_update: Callable[[Progress], None] | None = None,
    stop_requested: Callable[[], str | None] | None = None,
    max_unreachable_s: float = 600.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> JobStatus:
    """Poll until the job ends (or the guard ends it) and say how it ended."""
    watch = Watch(backend, handle, guard, poll_s, clock)
    last_seen_step = None
    while True:
        fresh = watch.poll(max_unreachable_s)
        if watch.failure == "lost":
            break
        if on_update and (watch.progress.step != last_seen_step or watch.snap.state in TERMINAL or fresh):
            on_update(watch.progress)
            last_seen_step = watch.progress.step
        if watch.snap.state in TERMINAL:
            break
        reason = guard_reason(watch.progress, guard, poll_s, watch.quiet_s())
        if reason is None and stop_requested is not None:
            asked = stop_requested()
            reason = ("flow cancelled", asked) if asked else None
        if reason is not None:
            watch.stop(reason, sleep)
            if on_update:
                on_update(watch.progress)
            break
        sleep(poll_s)
    return final_status(watch)


class Watch:
    """What following one job has seen so far: its state, its progress lines, when it was last
    heard from; one `poll` reads the job once."""

    def __init__(
        self, backend: Backend, handle: JobHandle, guard: Guard, poll_s: float, clock: Callable[[], float]
    ) -> None:
        self.backend, self.handle, self.guard, self.poll_s, self.clock = backend, handle, guard, poll_s, clock
        self.start = clock()
        self.records: list[ProgressLine] = []
        self.seen = handle.log_start
        self.snap = JobSnapshot(state="scheduling", billed_s=0.0)
        self.running_since: float | None = None
        self.last_line_at: float | None = None
        self.unreachable_since: float | None = None
        self.failure: str | None = None
        self.detail = ""
        self.now = self.start
        self.progress = summarise(self.records, self.snap, guard, 0.0)

    def poll(self, max_unreachable_s: float) -> list[ProgressLine]:
        """The job's state and its new progress lines; out of reach for too long, it is "lost"."""
        try:
            self.snap = self.backend.status(self.handle)
            new_lines = self.backend.read_log(self.handle, self.seen)
            self.unreachable_since = None
        except BackendError as e:
            # The job goes on without us; keep trying, counting its cost by our own clock.
            now = self.clock()
            self.unreachable_since = self.unreachable_since or now
            if now - self.unreachable_since > max_unreachable_s:
                self.failure = "lost"
                self.detail = f"lost contact with the job for {max_unreachable_s / 60:.0f} min: {e}"
                return []
            self.snap = self.snap.model_copy(update={"billed_s": self.snap.billed_s + self.poll_s})
            new_lines = []
        self.seen += len(new_lines)
        fresh = [r for r in map(parse_progress_line, new_lines) if r is not None]
        self.now = self.clock()
        if fresh:
            self.records += fresh
            self.last_line_at = self.now
        if self.snap.state == "running" and self.running_since is None:
            self.running_since = self.now
        self.progress = summarise(self.records, self.snap, self.guard, self.now - self.start)
        return fresh

    def quiet_s(self) -> float | None:
        """How long the running job has printed no progress line (its start-up grace counted)."""
        if self.running_since is None:
            return None
        if self.last_line_at is not None:
            return self.now - self.last_line_at
        return self.now - self.running_since - self.guard.startup_grace_s

    def stop(self, reason: tuple[str, str], sleep: Callable[[float], None]) -> None:
        """Cancel the job for `reason` and wait for its final billed time."""
        self.failure, self.detail = reason
        self.backend.cancel(self.handle)
        self.snap = _settle(self.backend, self.handle, self.snap, sleep)
        self.progress = summarise(self.records, self.snap, self.guard, self.clock() - self.start)


def final_status(watch: Watch) -> JobStatus:
    """How the job ended, with what it measured; a failure is sorted (out of memory, killed, error)."""
    failure, detail, snap, progress = watch.failure, watch.detail, watch.snap, watch.progress
    state = "failed" if failure == "lost" else "cancelled" if failure is not None else snap.state
    if state == "completed":
        detail = f"finished in {progress.elapsed_s:.1f} s ({progress.billed_s:.0f} s billed)"
    elif state == "cancelled" and not detail:
        detail = "cancelled" + (f": {snap.message}" if snap.message else " outside this flow")
    elif state == "failed" and failure != "lost":
        tail = watch.backend.logs(watch.handle, tail=30)
        failure = failure_kind(tail, snap.message)
        why = f" ({snap.message})" if snap.message else ""
        detail = f"the training job failed{why}; last lines of its log:\n{readable_tail(tail)}"
    handle = watch.handle
    return JobStatus(
        state=state,  # type: ignore[arg-type]
        detail=detail,
        failure=failure,  # type: ignore[arg-type]
        job_id=handle.job_id,
        backend=handle.backend,
        url=handle.url,
        billed_s=round(progress.billed_s, 1),
        tokens_per_s=progress.tokens_per_s,
        duration_s=round(progress.elapsed_s, 2),
        steps=progress.step,
        max_steps=progress.max_steps,
        losses=progress.losses,
        first_metrics=progress.first_metrics,
        last_metrics=progress.last_metrics,
        cost_usd=round(progress.cost_usd, 4),
    )


def failure_kind(tail: str, message: str | None) -> str:
    if any(m in tail for m in OOM_MARKERS):
        return "oom"
    if message and message.startswith("killed by signal"):
        return "killed"
    return "error"


def _settle(backend: Backend, handle: JobHandle, snap: JobSnapshot, sleep: Callable[[float], None]) -> JobSnapshot:
    """After a cancel, wait briefly for the job to stop, for its final billed time."""
    for _ in range(20):
        try:
            snap = backend.status(handle)
        except BackendError:
            return snap
        if snap.state in TERMINAL:
            return snap
        sleep(0.5)
    return snap
