"""`python -m flows.status RUN [--follow] [--json]`: the state of a run's job (the tool: cli/status.py)."""

import sys

from cli.status import main

if __name__ == "__main__":
    sys.exit(main())
