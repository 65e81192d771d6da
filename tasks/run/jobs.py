"""Find, follow and cancel a run's job from any process, by the handle in its run folder
(`python -m flows.status` and `flows.cancel` are cli/status.py and cli/cancel.py).

RUN is a run name (a folder under runs/, or $FINETUNE_RUNS_DIR) or a run folder's path.
The same handle lets a Prefect cancellation hook cancel the job of a cancelled flow run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tasks.core.models import JobHandle
from tasks.core.money import usd
from tasks.core.rundir import runs_root
from tasks.run.backends import BackendError, get_backend, load_handle
from tasks.run.progress_line import parse_progress_line


def run_folder(run: str) -> Path:
    path = Path(run)
    folder = path if (path / "job.json").exists() or path.is_absolute() else runs_root() / run
    if not (folder / "job.json").exists():
        raise SystemExit(
            f"no job recorded for run '{run}': {folder / 'job.json'} does not exist (a run writes it when its job "
            f"is submitted). Runs here: {', '.join(sorted(p.name for p in runs_root().glob('*/job.json'))) or 'none'}"
        )
    return folder


def describe(handle: JobHandle) -> dict[str, Any]:
    backend = get_backend(handle.backend)
    snap = backend.status(handle)
    lines = backend.read_log(handle, handle.log_start)
    records = [r for r in map(parse_progress_line, lines) if r is not None]
    last = records[-1] if records else None
    losses = [r.loss for r in records if r.loss is not None]
    plan_path = Path(handle.run_dir) / "plan.json"
    price = json.loads(plan_path.read_text())["cost"]["price_per_hour_usd"] if plan_path.exists() else 0.0
    return {
        "run": Path(handle.run_dir).name,
        "backend": handle.backend,
        "job_id": handle.job_id,
        "url": handle.url,
        "flavor": handle.flavor,
        "state": snap.state,
        "message": snap.message,
        "billed_s": round(snap.billed_s, 1),
        "cost_usd": round(snap.billed_s / 3600 * price, 4),
        "step": last.step if last else 0,
        "total": last.total if last else None,
        "loss": losses[-1] if losses else None,
        "log": handle.log_path,
        "last_lines": [x for x in lines if parse_progress_line(x) is None][-8:],
    }


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def run_state(folder: Path) -> dict[str, Any]:
    """Where a run stands, read from its folder alone, so any door that started it (command
    line, UI, deployment, REST, a recipe) can be followed from any terminal: finished or failed
    (its report), paused for a decision, training (its job), or only planned."""
    info: dict[str, Any] = {"run": folder.name, "folder": str(folder)}
    if (folder / "recipe.yaml").exists():
        return _recipe_state(folder, info)
    plan_at, report_at = _mtime(folder / "plan.json"), _mtime(folder / "report.json")
    if report_at is not None and (plan_at is None or report_at >= plan_at):
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        stages = data.get("stages") or []
        failed = next((st for st in stages if st["status"] == "failed"), None)
        ran = [st for st in stages if st["status"] not in ("not run",)]
        dry = not data.get("error") and all(st["status"] == "not run" for st in stages if st["stage"] == "submit_job")
        info.update(
            state="failed" if data.get("error") else "planned (dry run)" if dry else "finished",
            stage=(failed or (ran[-1] if ran else {"stage": None}))["stage"],
            stages={st["stage"]: st["status"] for st in stages},
            cost_usd=(data.get("job") or {}).get("cost_usd", 0.0),
            estimated_usd=((data.get("plan") or {}).get("cost") or {}).get("usd"),
            verdict=(data.get("evaluation") or {}).get("verdict"),
            error=data.get("error"),
            report=str(folder / "report.md"),
        )
        return info
    estimate = json.loads((folder / "plan.json").read_text(encoding="utf-8"))["cost"] if plan_at else None
    info["estimated_usd"] = estimate["usd"] if estimate else None
    approval_at = _mtime(folder / "approval.json")
    job_at = _mtime(folder / "job.json")
    handle = load_handle(folder) if job_at is not None else None
    latest = max(t for t in (plan_at, job_at, 0.0) if t is not None)
    if approval_at is not None and approval_at >= latest:  # the newest event: a pause, before or after the job
        kind = json.loads((folder / "approval.json").read_text(encoding="utf-8")).get("kind", "spend")
        info.update(
            state="paused",
            stage="approve" if kind == "spend" else "evaluate",
            waiting_for="approval of the spend" if kind == "spend" else "a decision on publishing a worse model",
            answer=f"python -m flows.approve {folder.name}"
            + (" [--reject]" if kind == "spend" else " --publish|--reject"),
            cost_usd=describe(handle)["cost_usd"] if handle is not None and kind != "spend" else 0.0,
        )
    elif handle is not None and (plan_at is None or (job_at or 0) >= plan_at):
        job = describe(handle)
        done = job["state"] == "completed"
        info.update(
            state="running",
            stage="evaluate, convert and publish" if done else "monitor",
            job=job,
            cost_usd=job["cost_usd"],
            step=job["step"],
            total=job["total"],
            loss=job["loss"],
        )
    elif plan_at is not None:
        info.update(state="planned", stage="approve or submit_job", cost_usd=0.0)
    else:
        info.update(state="starting", stage="validate_dataset", cost_usd=0.0)
    return info


def _recipe_state(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    import yaml

    recipe = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    stages = []
    for stage in recipe.get("stages") or []:
        child = folder.parent / f"{folder.name}-{stage['name']}"
        found = run_state(child) if child.exists() else {"run": child.name, "state": "not started"}
        stages.append(
            {
                "stage": stage["name"],
                "at": found.get("stage"),  # where that stage's run stands in the lifecycle
                **{k: found.get(k) for k in ("run", "state", "cost_usd", "verdict")},
            }
        )
    report = folder / "report.json"
    summary = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
    settled = report.exists() and all(st["state"] in ("finished", "failed", "not started") for st in stages)
    planned = bool(summary) and all(st.get("status") == "planned" for st in summary.get("stages", []))
    state = (
        "failed" if summary.get("error") else "planned (dry run)" if planned else "finished" if settled else "running"
    )
    info.update(
        kind="recipe",
        state=state,
        stages=stages,
        cost_usd=round(sum(st.get("cost_usd") or 0.0 for st in stages), 4),
        error=summary.get("error"),
        report=str(report.with_name("report.md")) if report.exists() else None,
    )
    return info


def status_text(info: dict[str, Any]) -> list[str]:
    """The console lines of a run's state."""
    head = f"{info['run']}: {info['state']}"
    if info.get("kind") == "recipe":
        out = [f"{head} (a recipe); spent {usd(info['cost_usd'])} so far"]
        out += [
            f"  {st['stage']}: run {st['run']} {st['state']}" + (f", {st['verdict']}" if st.get("verdict") else "")
            for st in info["stages"]
        ]
    else:
        out = [
            f"{head}, at stage {info.get('stage')}; cost {usd(info.get('cost_usd') or 0.0)}"
            + (f" of an estimated {usd(info['estimated_usd'])}" if info.get("estimated_usd") is not None else "")
        ]
        job = info.get("job")
        if job:
            steps = f"step {job['step']}/{job['total'] or '?'}"
            loss = f", loss {job['loss']:.4f}" if job["loss"] is not None else ""
            out.append(
                f"  {job['backend']} job {job['job_id']} {job['state']}"
                + (f" ({job['message']})" if job["message"] else "")
                + f"; {steps}{loss}; {job['billed_s']:.0f} s billed"
            )
            if job["url"]:
                out.append(f"  {job['url']}")
        if info.get("waiting_for"):
            out.append(f"  waiting for {info['waiting_for']}: {info['answer']}, or the Prefect UI's Resume form")
        if info.get("verdict"):
            out.append(f"  did it help? {info['verdict']}")
    if info.get("error"):
        out.append(f"  error: {info['error']}")
    if info.get("report"):
        out.append(f"  report: {info['report']}")
    return out


def cancel_job_of_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect on_cancellation hook: cancel the job this flow run submitted. It runs in
    another process than the flow (so it finds the job through the run folders' handles)."""
    wanted = str(flow_run.id)
    for path in runs_root().glob("*/job.json"):
        try:
            handle = JobHandle.model_validate_json(path.read_text())
        except ValueError:
            continue
        if handle.flow_run_id != wanted:
            continue
        try:
            backend = get_backend(handle.backend)
            if backend.status(handle).state not in ("completed", "failed", "cancelled"):
                backend.cancel(handle)
                print(f"cancelled {handle.backend} job {handle.job_id} of flow run {wanted}")
        except BackendError as e:
            print(f"could not cancel job {handle.job_id}: {e}", file=sys.stderr)
