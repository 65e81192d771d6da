"""Find, follow and cancel a run's job from any process, by the handle in its run folder.

    python -m flows.status RUN [--follow] [--json]   state, progress, cost so far, last log lines
    python -m flows.cancel RUN                        cancel the job (its last checkpoint stays)

RUN is a run name (a folder under runs/, or $FINETUNE_RUNS_DIR) or a run folder's path.
The same handle lets a Prefect cancellation hook cancel the job of a cancelled flow run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tasks.models import JobHandle
from tasks.money import usd
from tasks.run.backends import BackendError, get_backend, load_handle
from tasks.run.progress_line import parse_progress_line
from tasks.rundir import runs_root


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


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.status", description="state of a run's job")
    p.add_argument("run", help="run name (runs/<name>) or run folder")
    p.add_argument("--follow", action="store_true", help="repeat every few seconds until the job ends")
    p.add_argument("--json", action="store_true", help="print JSON (for agents)")
    args = p.parse_args(argv)
    handle = load_handle(run_folder(args.run))
    assert handle is not None
    while True:
        try:
            info = describe(handle)
        except BackendError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(info))
        else:
            steps = f"step {info['step']}/{info['total'] or '?'}"
            loss = f", loss {info['loss']:.4f}" if info["loss"] is not None else ""
            print(
                f"{info['run']}: {info['backend']} job {info['job_id']} {info['state']}"
                + (f" ({info['message']})" if info["message"] else "")
                + f"; {steps}{loss}; {info['billed_s']:.0f} s billed, {usd(info['cost_usd'])}"
            )
            if info["url"]:
                print(f"  {info['url']}")
            if not args.follow:
                for line in info["last_lines"]:
                    print(f"  | {line[:200]}")
        if not args.follow or info["state"] in ("completed", "failed", "cancelled"):
            return 0
        time.sleep(5)


def cancel_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.cancel", description="cancel a run's job")
    p.add_argument("run", help="run name (runs/<name>) or run folder")
    args = p.parse_args(argv)
    handle = load_handle(run_folder(args.run))
    assert handle is not None
    backend = get_backend(handle.backend)
    try:
        state = backend.status(handle).state
        if state in ("completed", "failed", "cancelled"):
            print(f"{handle.job_id} already {state}; nothing to cancel")
            return 0
        backend.cancel(handle)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"cancelled {handle.backend} job {handle.job_id}; its checkpoints stay, and running the same spec with "
        "the same name resumes from the last one"
    )
    return 0


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
