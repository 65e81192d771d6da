"""The SFT flow: `python -m flows.sft --spec examples/sft-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

sft = lifecycle.with_options(name="sft", description=method_definition("sft").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("sft", sft, plan_run))
