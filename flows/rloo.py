"""The RLOO flow: `python -m flows.rloo --spec SPEC [--dry-run] [--json]`; its example is a
recipe (an SFT warm-up, then RLOO): `python -m flows.recipe --spec examples/rloo-tiny.yaml`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

rloo = lifecycle.with_options(name="rloo", description=method_definition("rloo").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("rloo", rloo, plan_run))
