"""`python -m flows.cancel RUN`: cancel a run's job, keeping its checkpoints (the tool: cli/cancel.py)."""

import sys

from cli.cancel import main

if __name__ == "__main__":
    sys.exit(main())
