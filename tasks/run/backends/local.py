"""The `local` backend: the training script as a child process of this machine.

The job id and pid go to the run folder (job.json) so another process (a retry, a
cancellation hook, `python -m flows.status`) can find the job again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.models import InputUpload, JobHandle, JobSnapshot
from tasks.core.spec import runs_on_this_machine
from tasks.run.backends.base import Account, JobRequest, load_handle, save_handle, tail_lines

EXIT_STATUS = "exit_status"
SIGNAL_HINTS = {
    9: "SIGKILL: most often the kernel's out-of-memory killer (see `dmesg`), or a kill -9",
    15: "SIGTERM: stopped from outside",
    6: "SIGABRT: a crash in native code",
    11: "SIGSEGV: a crash in native code",
}


def how_it_ended(code: int | None) -> str:
    """An exit status as a person reads it: the shell reports a signal N as 128 + N."""
    if code is None:
        return "ended without an exit status (the process was gone before its shell could record one)"
    if code > 128:
        sig = code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by signal {sig} ({SIGNAL_HINTS.get(sig, name)})"
    return f"exit code {code}"


def pid_alive(pid: int) -> bool:
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


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first. accelerate's launcher starts its training
    processes in sessions of their own, so a signal to the job's process group misses them."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def read_complete_lines(path: Path, start: int) -> list[str]:
    """Lines of a growing log from `start` on; a line still being written is left for later."""
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1][start:]


class LocalBackend:
    """Runs the script with this interpreter; its output goes to logs/train.log."""

    name = "local"
    on_this_machine = runs_on_this_machine(name)
    poll_s = 1.0

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen] = {}
        self._line_counts: dict[str, int] = {}

    def model_reference(self, model_path: str, slot: str = "model") -> str:
        return model_path

    def planned_inputs(self, run_dir: Path, model_path: str, baseline_path: str | None = None) -> InputUpload | None:
        return None

    def preflight(self, flavor: str) -> Account:
        return Account(namespace=None, price_per_hour_usd=None, price_source="the plan (this machine's flavor)")

    def find_live(self, request: JobRequest) -> JobHandle | None:
        handle = load_handle(Path(request.run_dir))
        if handle is None or handle.backend != self.name or handle.attempt != request.attempt:
            return None
        state = self.status(handle).state
        if state == "running":  # never a second process beside it, whatever it runs
            return handle
        # Finished while no flow followed it (the flow's process was killed): the same
        # script's result is taken as it is instead of being paid for again.
        same = handle.labels.get("finetune-script") == request.script.sha256
        done = (Path(request.run_dir) / "train_result.json").exists()
        return handle if state == "completed" and same and done else None

    def submit(self, request: JobRequest) -> JobHandle:
        run_dir = Path(request.run_dir)
        log_path = run_dir / "logs" / "train.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_start = len(read_complete_lines(log_path, 0))
        for stale in ("train_result.json", "cancelled", EXIT_STATUS):
            (run_dir / stale).unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRACKIO_DIR": str(run_dir / "trackio")}
        env.pop("HF_DEBUG", None)  # it would log request bodies, tokens included
        log = log_path.open("ab")
        proc = subprocess.Popen(
            # a shell between us and the script records how the script ended, even when this
            # process is gone by then (a killed flow) or the script dies by a signal
            ["/bin/sh", "-c", '"$0" "$1"; echo $? > "$2"', sys.executable, request.script.path, EXIT_STATUS],
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
            flavor=request.flavor,
            attempt=request.attempt,
            flow_run_id=request.flow_run_id,
            labels={"finetune-run": request.run_name, "finetune-script": request.script.sha256},
            log_start=log_start,
        )
        save_handle(handle)
        return handle

    def _exit_code(self, handle: JobHandle) -> int | None:
        try:
            return int((Path(handle.run_dir) / EXIT_STATUS).read_text().strip())
        except (OSError, ValueError):
            return None

    def _state(self, handle: JobHandle) -> str:
        run_dir = Path(handle.run_dir)
        proc = self._procs.get(handle.job_id)
        if proc is not None:
            running = proc.poll() is None
        else:
            running = handle.pid is not None and pid_alive(handle.pid)
        if running:
            return "running"
        if (run_dir / "cancelled").exists():
            return "cancelled"
        if (run_dir / "train_result.json").exists() and self._exit_code(handle) in (0, None):
            return "completed"
        return "failed"

    def status(self, handle: JobHandle) -> JobSnapshot:
        state = self._state(handle)
        billed = (datetime.now(UTC) - handle.started_at).total_seconds()
        message = how_it_ended(self._exit_code(handle)) if state == "failed" else None
        return JobSnapshot(state=state, billed_s=max(billed, 0.0), message=message)  # type: ignore[arg-type]

    def read_log(self, handle: JobHandle, start: int) -> list[str]:
        return read_complete_lines(Path(handle.log_path), start)

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        path = Path(handle.log_path)
        if not path.exists():
            return ""
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        return tail_lines(text.splitlines(), tail)

    def cancel(self, handle: JobHandle) -> None:
        if handle.pid is None:
            return
        (Path(handle.run_dir) / "cancelled").write_text(datetime.now(UTC).isoformat())
        below = descendants(handle.pid)  # several training processes live in sessions of their own
        try:
            os.killpg(handle.pid, signal.SIGTERM)
        except ProcessLookupError:
            kill_all(below, signal.SIGKILL)
            return
        kill_all(below, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and self._state(handle) == "running":
            time.sleep(0.2)
        if self._state(handle) == "running":
            os.killpg(handle.pid, signal.SIGKILL)
        kill_all([p for p in below if pid_alive(p)], signal.SIGKILL)
        proc = self._procs.get(handle.job_id)
        if proc is not None:
            proc.wait(timeout=10)

    def fetch(self, handle: JobHandle) -> None:
        """The script wrote into the run folder already."""
