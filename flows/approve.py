"""Approve or decline a run paused for approval: `python -m flows.approve RUN [--reject]`.

RUN is the run's name (its folder under runs/) or the Prefect flow run id. The answer goes
through Prefect's `resume_flow_run` with the same typed input the UI form sends, so it
works against any Prefect server the flow run lives on (set PREFECT_API_URL for a remote
one). Over plain HTTP the same is:
  POST $PREFECT_API_URL/flow_runs/<flow-run-id>/resume
  {"run_input": {"approve": true, "reason": "...", "max_usd": 12.5}}
and the answer's "status" is "ACCEPT", or "REJECT" (with HTTP 200) for an invalid input.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from tasks.rundir import runs_root


def flow_run_id_for(run: str) -> str:
    try:
        return str(uuid.UUID(run))
    except ValueError:
        pass
    record = runs_root() / run / "approval.json"
    if not record.exists():
        raise SystemExit(
            f"no paused run named '{run}': {record} does not exist (the flow writes it when it pauses "
            "for approval). Give the flow run id instead, or check the run name."
        )
    return json.loads(record.read_text())["flow_run_id"]


def approve(run: str, approve: bool, reason: str = "", max_usd: float | None = None) -> str:
    from prefect.flow_runs import resume_flow_run

    flow_run_id = flow_run_id_for(run)
    run_input = {"approve": approve, "reason": reason}
    if max_usd is not None:
        run_input["max_usd"] = max_usd
    resume_flow_run(uuid.UUID(flow_run_id), run_input=run_input)
    return flow_run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.approve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="run name (runs/<name>) or Prefect flow run id")
    p.add_argument("--reject", action="store_true", help="decline the run instead of approving it")
    p.add_argument("--reason", default="", help="why; recorded in the run's report")
    p.add_argument("--max-usd", type=float, default=None, help="a new spending cap for this run")
    args = p.parse_args(argv)
    try:
        flow_run_id = approve(args.run, not args.reject, args.reason, args.max_usd)
    except SystemExit:
        raise
    except Exception as e:  # Prefect raises for unknown ids, runs not paused, invalid input
        print(f"error: could not resume {args.run}: {e}", file=sys.stderr)
        return 2
    print(f"{'declined' if args.reject else 'approved'}: flow run {flow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
