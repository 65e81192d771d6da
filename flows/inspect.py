"""`python -m flows.inspect DATASET [--method M]`: what a dataset is, for each method (the tool: cli/inspect.py)."""

import sys

from cli.inspect import main

if __name__ == "__main__":
    sys.exit(main())
