"""The KTO flow: `python -m flows.kto --spec examples/kto-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

kto = lifecycle.with_options(name="kto", description=method_definition("kto").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("kto", kto, plan_run))
