"""Where a training script runs, behind one interface: submit, status, logs, cancel.

`local` runs the script as a child process of this machine. The job id and pid are written
to the run folder (job.json) so another process (a retry, a cancellation hook) can find
the job again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from tasks.models import JobHandle, TrainingScript

JobState = Literal["running", "completed", "failed", "cancelled"]


class Backend(Protocol):
    def submit(self, script: TrainingScript, run_dir: Path) -> JobHandle: ...
    def status(self, handle: JobHandle) -> JobState: ...
    def logs(self, handle: JobHandle, tail: int = 50) -> str: ...
    def cancel(self, handle: JobHandle) -> None: ...


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A finished child stays a zombie until reaped; /proc tells the difference.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


class LocalBackend:
    """Runs the script with this interpreter; its output goes to logs/train.log."""

    name = "local"

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen] = {}

    def submit(self, script: TrainingScript, run_dir: Path) -> JobHandle:
        log_path = run_dir / "logs" / "train.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in ("train_result.json", "cancelled"):
            (run_dir / stale).unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRACKIO_DIR": str(run_dir / "trackio")}
        env.pop("HF_DEBUG", None)  # it would log request bodies, tokens included
        log = log_path.open("ab")
        proc = subprocess.Popen(
            [sys.executable, script.path],
            cwd=run_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group, so cancel reaches its children
        )
        log.close()
        job_id = f"local-{proc.pid}-{int(time.time())}"
        self._procs[job_id] = proc
        handle = JobHandle(
            backend=self.name,
            job_id=job_id,
            run_dir=str(run_dir),
            log_path=str(log_path),
            started_at=datetime.now(UTC),
            pid=proc.pid,
        )
        (run_dir / "job.json").write_text(handle.model_dump_json(indent=2))
        return handle

    def status(self, handle: JobHandle) -> JobState:
        run_dir = Path(handle.run_dir)
        proc = self._procs.get(handle.job_id)
        if proc is not None:
            code = proc.poll()
            running = code is None
        else:
            code, running = None, handle.pid is not None and _pid_alive(handle.pid)
        if running:
            return "running"
        if (run_dir / "cancelled").exists():
            return "cancelled"
        if (run_dir / "train_result.json").exists() and code in (0, None):
            return "completed"
        return "failed"

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        path = Path(handle.log_path)
        if not path.exists():
            return ""
        lines = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
        return "\n".join(line for line in lines[-tail:] if line.strip())

    def cancel(self, handle: JobHandle) -> None:
        if handle.pid is None:
            return
        (Path(handle.run_dir) / "cancelled").write_text(datetime.now(UTC).isoformat())
        try:
            os.killpg(handle.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + 10
        while time.time() < deadline and self.status(handle) == "running":
            time.sleep(0.2)
        if self.status(handle) == "running":
            os.killpg(handle.pid, signal.SIGKILL)
        proc = self._procs.get(handle.job_id)
        if proc is not None:
            proc.wait(timeout=10)


class UnavailableBackend:
    """A backend named in the spec whose submission is not built yet: says so, submits nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def submit(self, script: TrainingScript, run_dir: Path) -> JobHandle:
        raise NotImplementedError(
            f"backend '{self.name}' cannot submit jobs yet; the script is ready at {script.path} "
            "and runs by hand (`python train.py`). Use backend: local to run it here."
        )

    def status(self, handle: JobHandle) -> JobState:
        raise NotImplementedError(self.name)

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        raise NotImplementedError(self.name)

    def cancel(self, handle: JobHandle) -> None:
        raise NotImplementedError(self.name)


_LOCAL = LocalBackend()


def get_backend(name: str) -> Backend:
    return _LOCAL if name == "local" else UnavailableBackend(name)


def load_handle(run_dir: Path) -> JobHandle | None:
    path = run_dir / "job.json"
    return JobHandle.model_validate(json.loads(path.read_text())) if path.exists() else None
