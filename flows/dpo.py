"""The DPO flow: `python -m flows.dpo --spec examples/dpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle

dpo = lifecycle.with_options(
    name="dpo", description="Direct preference optimisation, through the same lifecycle as SFT."
)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("dpo", dpo, plan_run))
