"""`python -m flows.approve RUN [--reject]`: answer a paused run (the tool: cli/approve.py)."""

import sys

from cli.approve import main

if __name__ == "__main__":
    sys.exit(main())
