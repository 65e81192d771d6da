"""The GRPO flow: `python -m flows.grpo --spec examples/grpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.pipeline import lifecycle_flow

grpo = lifecycle_flow("grpo", "Group relative policy optimisation with verifiable rewards, through the same lifecycle.")

if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main("grpo", grpo))
