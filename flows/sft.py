"""The SFT flow: `python -m flows.sft --spec examples/sft-tiny.yaml [--dry-run] [--json]`."""

from __future__ import annotations

import sys

from flows.pipeline import lifecycle_flow

sft = lifecycle_flow("sft", "Supervised fine-tuning, through every lifecycle stage.")

if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main("sft", sft))
