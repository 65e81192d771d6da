"""`python -m flows.cancel RUN`: cancel a run's job, keeping its checkpoints (see flows/jobs.py)."""

import sys

from flows.jobs import cancel_main

if __name__ == "__main__":
    sys.exit(cancel_main())
