"""Cancel a run's job, keeping its checkpoints: `python -m flows.cancel RUN`."""

from __future__ import annotations

import argparse
import sys

from tasks.run.backends import BackendError, get_backend, load_handle
from tasks.run.jobs import run_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.cancel", description="cancel a run's job")
    p.add_argument("run", help="run name (runs/<name>) or run folder")
    args = p.parse_args(argv)
    handle = load_handle(run_folder(args.run))
    assert handle is not None
    backend = get_backend(handle.backend)
    try:
        state = backend.status(handle).state
        if state in ("completed", "failed", "cancelled"):
            print(f"{handle.job_id} already {state}; nothing to cancel")
            return 0
        backend.cancel(handle)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"cancelled {handle.backend} job {handle.job_id}; its checkpoints stay, and running the same spec with "
        "the same name resumes from the last one"
    )
    return 0
