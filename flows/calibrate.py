"""`python -m flows.calibrate`: refresh the planner's calibration from measured runs (the tool: cli/calibrate.py)."""

import sys

from cli.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
