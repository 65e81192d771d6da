"""The ORPO flow: `python -m flows.orpo --spec examples/orpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

orpo = lifecycle.with_options(name="orpo", description=method_definition("orpo").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("orpo", orpo, plan_run))
