"""The SFT flow: `python -m flows.sft --spec examples/sft-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from prefect import flow

from flows.pipeline import run_lifecycle
from tasks.models import RunSummary
from tasks.spec import RunSpec


@flow(name="sft", log_prints=True)
def sft(
    spec: RunSpec, dry_run: bool = False, approval_timeout_s: int = 3600, approve_up_to_usd: float | None = None
) -> RunSummary:
    """Supervised fine-tuning, through every lifecycle stage.

    Above the spec's auto_approve_usd the run pauses for approval (for at most
    approval_timeout_s); approve_up_to_usd pre-approves any estimate up to that amount."""
    if spec.method != "sft":
        raise ValueError(f"the sft flow got a {spec.method} spec")
    return run_lifecycle(
        spec, dry_run=dry_run, approval_timeout_s=approval_timeout_s, approve_up_to_usd=approve_up_to_usd
    )


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main("sft", sft))
