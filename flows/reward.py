"""The reward-model flow: `python -m flows.reward --spec examples/reward-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.lifecycle import lifecycle
from tasks.core.methods import method_definition

reward = lifecycle.with_options(name="reward", description=method_definition("reward").title)

if __name__ == "__main__":
    from cli.run import main
    from flows.planning import plan_run

    sys.exit(main("reward", reward, plan_run))
