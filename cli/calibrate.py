"""`python -m flows.calibrate [--runs DIR] [--json]`: refresh the planner's calibration table
from the runs that finished (their report.json: the plan's estimates and what the training
measured), and print it. Later plans for the same flavor, model family and mode use it."""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.core.rundir import runs_root
from tasks.plan.calibration import refresh, table_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.calibrate", description=__doc__)
    parser.add_argument(
        "--runs", type=Path, default=None, help="the runs folder (default: ./runs or $FINETUNE_RUNS_DIR)"
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    root = args.runs or runs_root()
    table = refresh(root)
    if args.json:
        print(table.model_dump_json(indent=2))
        return 0
    if not table.corrections:
        print(f"no finished run with measurements under {root}: the planner keeps its models uncorrected")
        return 0
    print(f"calibration from {root}, written to {table_path()}")
    print(f"{'flavor':<16} {'family':<12} {'mode':<6} {'runs':>4} {'time x':>8} {'memory x':>9}")
    for c in table.corrections:
        print(f"{c.flavor:<16} {c.family:<12} {c.mode:<6} {c.runs:>4} {c.time_factor:>8.3f} {c.memory_factor:>9.3f}")
    return 0
