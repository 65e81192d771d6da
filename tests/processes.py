"""Processes a user starts beside the engine (a Prefect server, `deployments.serve`, a worker),
started and stopped the way tests and docs/take_screenshots.py need them. Kept free of
conftest's side effects so that the screenshot script can import it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def stop_process(proc: subprocess.Popen) -> None:
    """The whole process group: a worker's or runner's flow-run subprocesses too."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def running_until_ready(
    args: list[str],
    env: dict[str, str],
    log: Path,
    ready_url: str,
    what: str,
    timeout_s: float,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Starts `args` in its own process group, logging to `log`, and yields once `ready_url`
    answers; stops the group afterwards. Fails with the log's tail if it dies or never answers."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}") from None
                time.sleep(1)
        yield proc
    finally:
        stop_process(proc)


def marked_processes(mark: str, variable: str = "FINETUNE_TEST_MARK") -> dict[int, str]:
    """Every live process whose environment carries `variable`=`mark` (children inherit it, and
    keep it when their parent dies), with its command line: what a run left behind."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{variable}={mark}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is gone, only not yet reaped
            found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def wait_until_gone(mark: str, keep: set[int], timeout_s: float = 20) -> dict[int, str]:
    """The marked processes outside `keep` once they have had `timeout_s` to end."""
    deadline = time.monotonic() + timeout_s
    while (left := {p: c for p, c in marked_processes(mark).items() if p not in keep}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
