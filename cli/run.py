"""The command line of `python -m flows.sft` (and dpo, grpo): a spec in, the run's summary out."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import yaml

from cli.server import bind_temporary_server
from tasks.core.errors import UserFacingError, error_payload
from tasks.core.locks import run_lock
from tasks.core.models import RunPlan
from tasks.core.rundir import named
from tasks.core.spec import Method, RunSpec, SpecError, load_spec, parse_spec
from tasks.report.render import plan_markdown, summary_text

# Runs with no Prefect server start a temporary one; offline it would log telemetry errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def set_override(data: dict[str, Any], dotted: str) -> None:
    key, sep, raw = dotted.partition("=")
    if not sep:
        raise SpecError(f"--set expects key=value, got '{dotted}'")
    value = yaml.safe_load(raw)
    target = data
    parts = key.split(".")
    for p in parts[:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise SpecError(f"--set {key}: '{p}' is not a mapping")
    target[parts[-1]] = value


def parse_args(method: Method, argv: list[str] | None) -> tuple[argparse.Namespace, RunSpec]:
    p = argparse.ArgumentParser(
        prog=f"python -m flows.{method}",
        description=f"Run the {method.upper()} fine-tuning lifecycle from a run spec.",
    )
    p.add_argument("--spec", help="run spec YAML (see examples/)")
    p.add_argument("--dataset", help="dataset path or Hub id (instead of, or over, the spec's)")
    p.add_argument("--model", help="model: 'tiny', a folder or a Hub id")
    p.add_argument("--name", help="run name (folder runs/<name>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. training.max_steps=50",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="plan only: validate, size, price and write the script; submit nothing"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for agents)")
    p.add_argument(
        "--approve-up-to",
        type=float,
        default=None,
        metavar="USD",
        help="pre-approve the run if its estimate (high end) is at most USD; otherwise it asks or stops",
    )
    p.add_argument(
        "--approval-timeout",
        type=int,
        default=3600,
        metavar="S",
        help="how long a paused run waits for approval before stopping unapproved (default 3600)",
    )
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for field in ("dataset", "model", "name"):
        if getattr(args, field):
            overrides[field] = getattr(args, field)
    for item in args.set:
        set_override(overrides, item)
    if args.spec:
        spec = load_spec(args.spec, overrides, default_method=method)
        if spec.method != method:
            raise SpecError(f"{args.spec} is a {spec.method} spec; run it with python -m flows.{spec.method}")
    elif "dataset" in overrides:
        spec = parse_spec({"method": method, **overrides}, source="command line")
    else:
        p.error("give --spec FILE (or at least --dataset)")
    return args, spec


def main(
    method: Method, flow_fn: Callable[..., Any], plan: Callable[[RunSpec], RunPlan], argv: list[str] | None = None
) -> int:
    """`flow_fn` runs the lifecycle; `plan` is its first part alone, for --dry-run (no server)."""
    if threading.current_thread() is threading.main_thread():
        # a stop from outside (kill, a terminal closing) is handled like Ctrl-C: the job is cancelled
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args, spec = parse_args(method, argv)
        if args.dry_run:
            spec = named(spec)
            with run_lock(str(spec.name)):  # a plan rewrites the run folder's script and data
                planned = plan(spec)
            print(plan_json(planned) if args.json else plan_markdown(planned))
            return 0
        bind_temporary_server()  # none is left running if this process is killed
        summary = flow_fn(spec=spec, approve_up_to_usd=args.approve_up_to, approval_timeout_s=args.approval_timeout)
    except KeyboardInterrupt:
        print("interrupted: the run stopped (its job, if one was running, was cancelled)", file=sys.stderr)
        return 130
    except (UserFacingError, SpecError, ValueError, NotImplementedError, RuntimeError) as e:
        if "--json" in (sys.argv[1:] if argv is None else argv):  # also when the arguments themselves failed
            print(json.dumps(error_payload(e)))
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        print(summary_text(summary))
    return 0 if summary.error is None else 1


def plan_json(plan: RunPlan) -> str:
    return json.dumps(plan.model_dump(mode="json"), indent=2)
