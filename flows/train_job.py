"""The training step as a flow run of its own: what a work pool's worker runs for
`backend: prefect-pool` (deployment `finetune-train/train` in prefect.yaml).

It reads one attempt's inputs from the shared storage the parent wrote them to, runs the
generated script as the local backend does (`python train.py`: with several processes in the
plan the script launches itself through `accelerate launch` and its generated config),
mirrors the script's output to the storage every few seconds so the parent can follow the
progress, and writes the outputs back. The parent never sees this machine's disk.

Stopping: a cancelled flow run's worker terminates this process's group, which the script and
the processes it launches belong to; an interrupted flow (any exception, the worker's signal
included) also stops the script itself before it ends, so no training outlives its flow run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.run.backends.local import descendants, how_it_ended, kill_all, pid_alive
from tasks.run.storage import CheckpointMirror, RunStorage

MIRROR_S = 2.0  # how often the log is copied to the storage while the script runs
OUTPUTS = ("model", "adapter", "trackio", "train_result.json")


class TrainingJobFailed(RuntimeError):
    """The script ended without success; the message says how and where its log is."""


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """The script and every process below it (accelerate's training processes run in sessions of
    their own): SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    everyone = [proc.pid, *descendants(proc.pid)]
    kill_all(everyone, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    kill_all([p for p in everyone if pid_alive(p)], signal.SIGKILL)
    proc.wait(timeout=grace_s)


def run_training_job(storage: str, checkpoints: str | None = None, mirror_s: float = MIRROR_S) -> dict[str, Any]:
    """The plain function the flow wraps: inputs in, script run, outputs out; with `checkpoints`
    (a folder of the run's, kept across its attempts) the newest checkpoint in first, and each new
    one out as soon as it is complete."""
    store = RunStorage(storage)
    work = Path(tempfile.mkdtemp(prefix="finetune-train-"))
    try:
        names = store.get_tree("inputs", work)
        if "train.py" not in names:
            raise TrainingJobFailed(f"no train.py under {store.url}/inputs: the parent run did not upload its inputs")
        mirror = CheckpointMirror(RunStorage(checkpoints), work / "checkpoints") if checkpoints else None
        if mirror is not None and (restored := mirror.restore()):
            print(f"{restored} from {checkpoints}: the script resumes from it")
        log_path = work / "logs" / "train.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRACKIO_DIR": str(work / "trackio")}
        env.pop("HF_DEBUG", None)  # it would log request bodies, tokens included
        store.write_text("worker", f"{socket.gethostname()} {work}\n")  # where it ran, for whoever follows it
        print(f"running train.py from {store.url}/inputs in {work}")
        with log_path.open("ab") as log:
            # the script stays in this process's group, so the worker's kill of a cancelled run reaches it
            proc = subprocess.Popen(
                [sys.executable, "train.py"],
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            while proc.poll() is None:
                time.sleep(mirror_s)
                store.write_text("logs/train.log", log_path.read_text(encoding="utf-8", errors="replace"))
                if mirror is not None:
                    mirror.sync()
        except BaseException:
            _stop(proc)
            raise
        finally:
            store.write_text("logs/train.log", log_path.read_text(encoding="utf-8", errors="replace"))
            if mirror is not None:
                mirror.sync()
        code = proc.returncode
        for name in OUTPUTS:
            local = work / name
            if local.is_dir():
                store.put_tree(local, f"outputs/{name}")
            elif local.is_file():
                store.put([(local, name)], "outputs")
        store.write_text("exit_status", str(code))
        if code != 0:
            raise TrainingJobFailed(f"train.py {how_it_ended(code)}; its log: {store.url}/logs/train.log")
        print(f"train.py finished; outputs in {store.url}/outputs")
        return {"storage": store.url, "exit_status": code, "outputs": [n for n in OUTPUTS if (work / n).exists()]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@flow(name="finetune-train", log_prints=True)
def train_job(storage: str, run_name: str = "", attempt: int = 1, checkpoints: str | None = None) -> dict[str, Any]:
    """One training attempt of a run (`run_name`, `attempt` name it in the UI), from and to `storage`;
    its checkpoints kept in `checkpoints` across attempts."""
    return run_training_job(storage, checkpoints)
