"""The local backend and the monitor: real processes, real Trackio store, budget guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.core.models import TrainingScript
from tasks.run.backends import JobRequest, load_handle
from tasks.run.backends.local import LocalBackend
from tasks.run.fetch import JobFailed, fetch_artifacts
from tasks.run.monitor import Guard, monitor_job, read_trackio_metrics
from tests.helpers import wait_until

FREE = Guard(max_usd=1.0, price_per_hour_usd=0.0)


def _script(run_dir: Path, body: str) -> JobRequest:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "train.py"
    path.write_text(textwrap.dedent(body))
    script = TrainingScript(path=str(path), sha256="0", method="sft", trainer="SFTTrainer", config={})
    return JobRequest(
        run_name=run_dir.name, run_dir=str(run_dir), script=script, model_path="tiny", flavor="local-cpu", timeout_s=60
    )


def test_metrics_are_read_from_trackios_own_store_while_it_is_written(tmp_path):
    writer = textwrap.dedent(
        """
        import trackio
        trackio.init(project="proj", name="run-a")
        for step in range(1, 4):
            trackio.log({"train/loss": 4.0 / step, "train/global_step": step * 5})
        trackio.finish()
        """
    )
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True, capture_output=True, timeout=120)
    rows = read_trackio_metrics(tmp_path, "proj", "run-a")
    assert [r["train/global_step"] for r in rows] == [5, 10, 15]
    assert rows[-1]["train/loss"] == 4.0 / 3
    assert read_trackio_metrics(tmp_path, "proj", "other-run") == []
    assert read_trackio_metrics(tmp_path / "missing", "proj", "run-a") == []


def test_a_completed_job_is_followed_to_the_end(tmp_path):
    run_dir = tmp_path / "run"
    script = _script(
        run_dir,
        """
        import json, pathlib
        here = pathlib.Path(__file__).parent
        print("FINETUNE_PROGRESS " + json.dumps({"step": 3, "total": 3, "loss": 0.5, "elapsed_s": 1.0}))
        (here / "train_result.json").write_text(json.dumps({"model_dir": "model", "adapter_dir": None}))
        print("all good")
        """,
    )
    backend = LocalBackend()
    handle = backend.submit(script)
    assert load_handle(run_dir) == handle  # persisted for other processes
    seen = []
    status = monitor_job(backend, handle, FREE, poll_s=0.1, on_update=seen.append)
    assert status.state == "completed" and status.steps == 3 and status.max_steps == 3
    assert seen and seen[-1].percent == 100.0
    assert "all good" in Path(handle.log_path).read_text()
    # the script claimed success but wrote no model: fetching says so
    try:
        fetch_artifacts(backend, handle, status)
        raise AssertionError("fetch should fail")
    except JobFailed as e:
        assert "incomplete" in str(e) and "config.json" in str(e)


def test_a_failing_job_reports_the_end_of_its_log(tmp_path):
    run_dir = tmp_path / "run"
    script = _script(run_dir, "raise SystemExit('CUDA out of memory: tried to allocate 2 GiB')\n")
    backend = LocalBackend()
    handle = backend.submit(script)
    status = monitor_job(backend, handle, FREE, poll_s=0.1)
    assert status.state == "failed"
    assert "CUDA out of memory" in status.detail


class _FakeClock:
    """Time that passes only when the monitor sleeps: the backend's billing clock and the
    monitor's, so a guard's decision does not depend on how fast this machine polls."""

    def __init__(self) -> None:
        self.now = 0.0
        self.epoch = datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def datetime(self) -> type[datetime]:
        clock = self

        class _Datetime(datetime):
            @classmethod
            def now(cls, tz=None):  # noqa: ANN001, ANN206
                return clock.epoch + timedelta(seconds=clock.now)

        return _Datetime


def test_the_budget_guard_cancels_a_job_before_it_passes_max_usd(tmp_path, monkeypatch):
    import tasks.run.backends.local as local

    clock = _FakeClock()
    monkeypatch.setattr(local, "datetime", clock.datetime())  # the job is billed by this clock
    run_dir = tmp_path / "run"
    script = _script(run_dir, "import time\ntime.sleep(120)\n")
    backend = LocalBackend()
    handle = backend.submit(script)
    # $3600/h is $1/s: with max_usd $1.5 the guard must stop it within about a second
    guard = Guard(max_usd=1.5, price_per_hour_usd=3600.0)
    status = monitor_job(backend, handle, guard, poll_s=0.25, clock=clock.monotonic, sleep=clock.sleep)
    assert status.state == "cancelled" and "budget guard" in status.detail
    assert status.duration_s <= 1.5  # stopped within the 1.5 s that max_usd buys, by the clock it was billed by
    assert status.cost_usd <= 1.5
    assert backend.status(handle).state == "cancelled"


def test_a_job_is_found_again_from_another_backend_instance(tmp_path):
    run_dir = tmp_path / "run"
    script = _script(run_dir, "import time\ntime.sleep(30)\n")
    first = LocalBackend()
    handle = first.submit(script)
    other = LocalBackend()  # e.g. a retry or a cancellation hook in another process
    assert other.status(load_handle(run_dir)).state == "running"
    assert other.find_live(script) == handle  # a second start of the run re-attaches
    other.cancel(handle)
    first._procs[handle.job_id].wait(timeout=15)
    assert first.status(handle).state == "cancelled"
    assert other.find_live(script) is None


def test_a_job_killed_by_a_signal_says_how_it_died(tmp_path):
    run_dir = tmp_path / "run"
    script = _script(run_dir, "import os, signal\nprint('step 3/10')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    backend = LocalBackend()
    status = monitor_job(backend, backend.submit(script), FREE, poll_s=0.1)
    assert status.state == "failed" and status.failure == "killed"
    assert "killed by signal 9 (SIGKILL: most often the kernel's out-of-memory killer" in status.detail


def test_one_flow_per_run_name_and_per_publish_target(tmp_path):
    import pytest

    from tasks.core.locks import RunLocked, publish_lock, run_lock

    with run_lock("busy-run"):
        with pytest.raises(RunLocked, match=r"run 'busy-run' is in use by another flow \(pid \d+"):
            with run_lock("busy-run"):
                pass
        with run_lock("other-run"):  # another name is free
            pass
        with publish_lock("me/model"):
            with pytest.raises(RunLocked, match="publish target 'me/model'.*choose another outputs.hub_repo"):
                with publish_lock("me/model"):
                    pass
    with run_lock("busy-run"):  # released when the first flow ends
        pass


def test_a_lock_held_by_a_killed_process_is_free_again(tmp_path):
    from tasks.core.locks import run_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from tasks.core.locks import run_lock\nwith run_lock('crashy'):\n    print('held', flush=True)\n"
            "    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=10)
    with run_lock("crashy"):  # the kernel released it with the process
        pass


def test_a_second_flow_on_a_run_that_is_being_driven_is_refused_at_once(prefect_server):
    import pytest

    from flows.sft import sft
    from tasks.core.locks import RunLocked, run_lock
    from tasks.core.spec import parse_spec
    from tests.helpers import EXAMPLES

    spec = parse_spec({"dataset": str(EXAMPLES / "data" / "sft_chat.jsonl"), "name": "twice"})
    with run_lock("twice"), pytest.raises(RunLocked, match="run 'twice' is in use by another flow"):
        sft(spec=spec)


def test_a_job_that_finished_while_no_flow_followed_it_is_taken_not_run_again(tmp_path):
    run_dir = tmp_path / "run"
    script = _script(run_dir, "open('train_result.json', 'w').write('{}')\n")
    backend = LocalBackend()
    handle = backend.submit(script)
    backend._procs[handle.job_id].wait(timeout=30)
    assert LocalBackend().find_live(script) == handle  # e.g. the flow's process was killed meanwhile
    changed = script.model_copy(update={"script": script.script.model_copy(update={"sha256": "1"})})
    assert LocalBackend().find_live(changed) is None  # another script's result is not taken


def _stubborn_launch(run_dir: Path) -> JobRequest:
    """A launcher like accelerate's: training processes in sessions of their own, all deaf to SIGTERM."""
    return _script(
        run_dir,
        """
        import pathlib, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        workers = [subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True) for _ in range(2)]
        pathlib.Path(__file__).with_name("workers").write_text(" ".join(str(w.pid) for w in workers))
        time.sleep(600)
        """,
    )


def _launched(backend: LocalBackend, run_dir: Path):
    handle = backend.submit(_stubborn_launch(run_dir))
    workers = run_dir / "workers"  # written by the launcher once both have started: read it whole
    pids = wait_until(lambda: workers.exists() and len(workers.read_text().split()) == 2 and workers.read_text(), 120)
    return handle, [int(p) for p in pids.split()]


def test_cancel_stops_training_processes_that_live_in_sessions_of_their_own(tmp_path):
    """accelerate's launcher starts its training processes with start_new_session, out of the
    job's process group; a cancel must reach them even when they ignore SIGTERM."""
    from tasks.run.backends.local import pid_alive

    backend = LocalBackend()
    handle, workers = _launched(backend, tmp_path / "run")
    backend.cancel(handle)
    wait_until(lambda: not any(pid_alive(p) for p in workers), 60, f"the workers {workers} to stop")
    assert not any(pid_alive(p) for p in workers)
    assert backend.status(handle).state == "cancelled"


def test_an_interrupted_flow_cancels_the_job_it_follows(tmp_path):
    """Ctrl-C, or SIGTERM (which `python -m flows.sft` turns into the same interrupt), stops the job
    rather than leave it training unfollowed; a job already ended is left as it is."""
    from tasks.run.backends.local import pid_alive
    from tasks.run.training import stop_on_interrupt

    backend = LocalBackend()
    handle, workers = _launched(backend, tmp_path / "run")
    said: list[str] = []
    stop_on_interrupt(backend, handle, "run", said.append)
    wait_until(lambda: not any(pid_alive(p) for p in workers), 60, f"the workers {workers} to stop")
    assert not any(pid_alive(p) for p in workers)
    assert said[0].startswith(f"interrupted: cancelling job {handle.job_id}") and "resumes" in said[1]
    stop_on_interrupt(backend, handle, "run", said.append)
    assert len(said) == 2  # nothing left to cancel, nothing said


def test_a_pool_attempt_leaves_its_checkpoints_on_the_storage_and_the_next_attempt_resumes_from_them(tmp_path):
    """The pool's worker trains in a temporary folder; each complete checkpoint goes to the run's
    checkpoints folder on the storage as it appears (one cut off while saving does not), and the
    next attempt starts with the newest of them next to the script."""
    import pytest

    from flows.train_job import TrainingJobFailed, run_training_job
    from tasks.run.storage import RunStorage

    shared = tmp_path / "shared"
    script = """\
        import json, sys
        from pathlib import Path
        ckpt = Path("checkpoints")
        found = sorted(p.name for p in ckpt.glob("checkpoint-*")) if ckpt.exists() else []
        print("found", found, flush=True)
        if not found:  # the first attempt: two complete checkpoints, a third cut off, then it dies
            for step in (4, 8, 12):
                folder = ckpt / f"checkpoint-{step}"
                folder.mkdir(parents=True)
                (folder / "model.safetensors").write_bytes(b"weights %d" % step)
                if step != 12:
                    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            sys.exit(137)
        Path("train_result.json").write_text("{}")
    """
    for attempt in (1, 2):
        inputs = RunStorage(str(shared)).child("run", f"attempt-{attempt}")
        (tmp_path / "train.py").write_text(textwrap.dedent(script))
        inputs.put([(tmp_path / "train.py", "train.py")], "inputs")
    checkpoints = str(shared / "run" / "checkpoints")
    with pytest.raises(TrainingJobFailed, match="signal 9"):
        run_training_job(str(shared / "run" / "attempt-1"), checkpoints, mirror_s=0.1)
    assert sorted(p.name for p in (shared / "run" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    run_training_job(str(shared / "run" / "attempt-2"), checkpoints, mirror_s=0.1)
    log = (shared / "run" / "attempt-2" / "logs" / "train.log").read_text()
    assert "found ['checkpoint-8']" in log
