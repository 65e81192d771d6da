"""`python -m flows.status RUN [--follow] [--json]`: the state of a run's job (see flows/jobs.py)."""

import sys

from flows.jobs import status_main

if __name__ == "__main__":
    sys.exit(status_main())
