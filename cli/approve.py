"""Answer a paused run: `python -m flows.approve RUN [--reject]`.

A run pauses for two decisions: a spend above the auto-approval threshold (approve or
decline), and a trained model that came out worse than its base (publish anyway, with
`--publish` or plain approval, or stop with `--reject`). The run's approval.json says which.

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

from tasks.core.rundir import runs_root


def paused_run(run: str) -> tuple[str, str]:
    """The flow run id and what it waits for ("spend" or "publish")."""
    try:
        return str(uuid.UUID(run)), "spend"
    except ValueError:
        pass
    record = runs_root() / run / "approval.json"
    if not record.exists():
        raise SystemExit(
            f"no paused run named '{run}': {record} does not exist (the flow writes it when it pauses "
            "for a decision). Give the flow run id instead, or check the run name."
        )
    found = json.loads(record.read_text())
    return found["flow_run_id"], found.get("kind", "spend")


def approve(run: str, approve: bool, reason: str = "", max_usd: float | None = None) -> str:
    from prefect.flow_runs import resume_flow_run

    flow_run_id, kind = paused_run(run)
    run_input: dict = {"publish": approve, "reason": reason} if kind == "publish" else {"approve": approve}
    run_input["reason"] = reason
    if max_usd is not None and kind == "spend":
        run_input["max_usd"] = max_usd
    resume_flow_run(uuid.UUID(flow_run_id), run_input=run_input)
    return flow_run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.approve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="run name (runs/<name>) or Prefect flow run id")
    p.add_argument("--reject", action="store_true", help="decline the spend, or stop the publish of a worse model")
    p.add_argument("--publish", action="store_true", help="publish a model that came out worse (the default answer)")
    p.add_argument("--reason", default="", help="why; recorded in the run's report")
    p.add_argument("--max-usd", type=float, default=None, help="a new spending cap for this run")
    args = p.parse_args(argv)
    if args.reject and args.publish:
        p.error("--publish and --reject contradict each other; give one")
    try:
        flow_run_id = approve(args.run, not args.reject, args.reason, args.max_usd)
    except SystemExit:
        raise
    except Exception as e:  # Prefect raises for unknown ids, runs not paused, invalid input
        print(f"error: could not resume {args.run}: {e}", file=sys.stderr)
        return 2
    print(f"{'declined' if args.reject else 'approved'}: flow run {flow_run_id}")
    return 0
