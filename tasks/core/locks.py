"""One flow at a time per run name and per publish target, across processes; one measurement of
the machine at a time (`waited`).

An advisory lock (flock) on a file under runs/.locks/: the kernel releases it when the
holding process ends, however it ends (a killed flow leaves no stale lock behind). The file
records who holds it, for the message the second flow gets.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.errors import UserFacingError
from tasks.core.rundir import runs_root


class RunLocked(UserFacingError, RuntimeError):
    """Another flow drives the same run or publishes to the same target right now."""


def _lock_dir() -> Path:
    path = runs_root() / ".locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def exclusive(path: Path, what: str, hint: str) -> Iterator[None]:
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLocked(f"{what} is in use by another flow ({holder}); {hint}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}, since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextmanager
def waited(path: Path, wait_s: float) -> Iterator[None]:
    """The lock at `path`, waited for up to `wait_s` seconds; TimeoutError past that."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process held it for over {wait_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_lock(run_name: str) -> AbstractContextManager[None]:
    return exclusive(
        _lock_dir() / f"run-{run_name}.lock",
        f"run '{run_name}'",
        f"wait for it to finish (`python -m flows.status {run_name}` follows its job), or choose another `name`",
    )


def publish_lock(target: str) -> AbstractContextManager[None]:
    key = hashlib.sha256(target.encode()).hexdigest()[:16]
    return exclusive(
        _lock_dir() / f"publish-{key}.lock",
        f"the publish target '{target}'",
        "two runs would overwrite each other's release; wait for the other run to publish, or choose another "
        "outputs.hub_repo",
    )
