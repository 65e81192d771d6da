"""The DPO flow: `python -m flows.dpo --spec examples/dpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from prefect import flow

from flows.pipeline import run_lifecycle
from tasks.models import RunSummary
from tasks.spec import RunSpec


@flow(name="dpo", log_prints=True)
def dpo(
    spec: RunSpec, dry_run: bool = False, approval_timeout_s: int = 3600, approve_up_to_usd: float | None = None
) -> RunSummary:
    """Direct preference optimisation, through every lifecycle stage (same pipeline as SFT)."""
    if spec.method != "dpo":
        raise ValueError(f"the dpo flow got a {spec.method} spec")
    return run_lifecycle(
        spec, dry_run=dry_run, approval_timeout_s=approval_timeout_s, approve_up_to_usd=approve_up_to_usd
    )


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main("dpo", dpo))
