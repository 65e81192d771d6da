"""The DPO flow: `python -m flows.dpo --spec examples/dpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

dpo = lifecycle.with_options(name="dpo", description=method_definition("dpo").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("dpo", dpo, plan_run))
