"""The DPO flow: `python -m flows.dpo --spec examples/dpo-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.pipeline import lifecycle_flow

dpo = lifecycle_flow("dpo", "Direct preference optimisation, through the same lifecycle as SFT.")

if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main("dpo", dpo))
