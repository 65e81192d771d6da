"""Where a run (or a recipe) stands, whichever door started it: `python -m flows.status RUN [--follow] [--json]`.

RUN is a run name (a folder under runs/, or $FINETUNE_RUNS_DIR) or a run folder's path."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks.core.rundir import runs_root
from tasks.run.backends import BackendError
from tasks.run.jobs import run_state, status_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.status", description="where a run (or a recipe) stands, whichever door started it"
    )
    p.add_argument("run", help="run or recipe name (runs/<name>) or run folder")
    p.add_argument("--follow", action="store_true", help="repeat every few seconds until the run ends")
    p.add_argument("--json", action="store_true", help="print JSON (for agents)")
    args = p.parse_args(argv)
    path = Path(args.run)
    folder = path if path.is_absolute() or (path / "plan.json").exists() else runs_root() / args.run
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in runs_root().glob("*") if p.is_dir())) or "none"
        print(
            f"error: no run named '{args.run}' in {runs_root()} (FINETUNE_RUNS_DIR); runs here: {known}",
            file=sys.stderr,
        )
        return 2
    while True:
        try:
            info = run_state(folder)
        except BackendError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(info))
        else:
            print("\n".join(status_text(info)))
            job = info.get("job")
            if job and not args.follow:
                for line in job["last_lines"]:
                    print(f"  | {line[:200]}")
        if not args.follow or info["state"] not in ("running", "paused", "planned", "starting"):
            return 0
        time.sleep(5)
