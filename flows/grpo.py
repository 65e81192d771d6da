"""The GRPO flow: `python -m flows.grpo --spec examples/grpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

grpo = lifecycle.with_options(name="grpo", description=method_definition("grpo").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("grpo", grpo, plan_run))
