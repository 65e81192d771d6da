"""Stage 7: follow a running job until it ends, with its metrics, progress and budget guard.

Metrics are read from Trackio's local store (its SQLite file, opened read-only while the
job writes it); the step total comes from the script's progress.json. Each poll produces a
`Progress` that the Prefect wrapper turns into a progress artifact and a loss table.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.backends import Backend
from tasks.models import JobHandle, JobStatus, LossPoint


class Progress(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: int
    max_steps: int | None
    elapsed_s: float
    cost_usd: float
    losses: list[LossPoint]
    first_metrics: dict[str, float]
    last_metrics: dict[str, float]

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.max_steps if self.max_steps else 0.0


def read_trackio_metrics(trackio_dir: Path, project: str, run_name: str) -> list[dict[str, float]]:
    """Every logged metrics row of one run, oldest first; empty until the first log."""
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


def losses_from(rows: list[dict[str, float]]) -> list[LossPoint]:
    return [
        LossPoint(step=int(r.get("train/global_step", i)), loss=r["train/loss"])
        for i, r in enumerate(rows)
        if "train/loss" in r
    ]


def _training_rows(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Rows logged during training (the final summary row carries train_runtime instead)."""
    return [r for r in rows if "train/loss" in r]


def read_progress(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def monitor_job(
    backend: Backend,
    handle: JobHandle,
    run_name: str,
    price_per_hour_usd: float,
    max_usd: float,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    on_update: Callable[[Progress], None] | None = None,
    stop_requested: Callable[[], str | None] | None = None,
) -> JobStatus:
    """Poll until the job ends; cancel it first if it would pass max_usd or the timeout,
    or if `stop_requested` returns a reason (a cancelled flow run, say)."""
    run_dir = Path(handle.run_dir)
    start = time.monotonic()
    stop_reason: str | None = None
    last_step = -1
    while True:
        state = backend.status(handle)
        elapsed = time.monotonic() - start
        cost = elapsed / 3600 * price_per_hour_usd
        rows = read_trackio_metrics(run_dir / "trackio", run_name, run_name)
        training = _training_rows(rows)
        progress_file = read_progress(run_dir)
        step = int(progress_file.get("step", 0))
        progress = Progress(
            step=step,
            max_steps=progress_file.get("max_steps"),
            elapsed_s=elapsed,
            cost_usd=cost,
            losses=losses_from(rows),
            first_metrics=training[0] if training else {},
            last_metrics=training[-1] if training else {},
        )
        if on_update and (step != last_step or state != "running"):
            on_update(progress)
            last_step = step
        if state != "running":
            break
        if price_per_hour_usd > 0 and (elapsed + poll_s) / 3600 * price_per_hour_usd > max_usd:
            stop_reason = f"budget guard: the next poll would pass max_usd ${max_usd:.2f}"
        elif timeout_s is not None and elapsed > timeout_s:
            stop_reason = f"timeout: still running after {timeout_s:.0f} s"
        elif stop_requested is not None:
            stop_reason = stop_requested()
        if stop_reason:
            backend.cancel(handle)
            state = "cancelled"
            break
        time.sleep(poll_s)

    if state == "completed":
        detail = f"finished in {elapsed:.1f} s"
    elif state == "cancelled":
        detail = stop_reason or "cancelled"
    else:
        detail = "the training process failed; last lines of its log:\n" + backend.logs(handle, tail=25)
    return JobStatus(
        state=state,  # type: ignore[arg-type]
        detail=detail,
        duration_s=round(elapsed, 2),
        steps=progress.step,
        max_steps=progress.max_steps,
        losses=progress.losses,
        first_metrics=progress.first_metrics,
        last_metrics=progress.last_metrics,
        cost_usd=round(cost, 4),
    )
