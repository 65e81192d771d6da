"""A job killed mid-run (the out-of-memory killer, a preempted machine) is reported with how
it died, and the next run of the flow resumes it from its last checkpoint on every backend:
the step counter and the loss curve continue, no optimizer step repeated or lost."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import yaml

from flows.sft import sft
from tasks.core.spec import load_spec
from tasks.run.backends import load_handle
from tasks.run.backends.local import descendants, pid_alive
from tests.helpers import EXAMPLES, REPO, seed_prefect_home
from tests.processes import marked_processes, wait_until_gone

STEPS, SAVE, LOG = 24, 4, 2


def _spec(tmp_path: Path, example: str, name: str) -> object:
    return load_spec(
        EXAMPLES / example,
        {
            "name": name,
            "training": {"max_steps": STEPS, "save_steps": SAVE, "logging_steps": LOG},
            "outputs": {"hub_repo": str(tmp_path / "published" / name), "gguf": []},
        },
    )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


class _Killed(list):
    real_update: object


def _kill_local_training_at(monkeypatch: pytest.MonkeyPatch, run_dir: Path, step: int) -> _Killed:
    """SIGKILL the training process (not its shell wrapper), as the OOM killer would, once
    the monitor has seen `step`."""
    from tasks.stages.training import ProgressReporter

    real_update = ProgressReporter.update
    killed = _Killed()
    killed.real_update = real_update

    def update(self: ProgressReporter, p: object) -> None:
        real_update(self, p)  # type: ignore[arg-type]
        if p.step >= step and not killed:  # type: ignore[attr-defined]
            handle = load_handle(run_dir)
            assert handle is not None and handle.pid
            for child in _children(handle.pid):
                os.kill(child, signal.SIGKILL)
            killed.append(p.step)  # type: ignore[attr-defined]

    monkeypatch.setattr(ProgressReporter, "update", update)
    return killed


def _check_resumed(first_losses: list[dict], summary: object, run_dir: Path) -> None:
    job = summary.job  # type: ignore[attr-defined]
    assert summary.error is None and job.state == "completed"  # type: ignore[attr-defined]
    assert job.steps == job.max_steps == STEPS
    assert [p.step for p in job.losses] == list(range(LOG, STEPS + 1, LOG)), "each step once, none lost"
    log = (run_dir / "logs" / "train.log").read_text()
    resumed_at = int(log.split("resuming from ")[-1].split("checkpoint-")[1].split()[0])
    assert resumed_at >= SAVE and resumed_at % SAVE == 0
    before = {p["step"]: p["loss"] for p in first_losses if p["step"] <= resumed_at}
    after = {p.step: p.loss for p in job.losses if p.step <= resumed_at}
    assert after == pytest.approx(before), "the curve up to the checkpoint is the first job's"


def test_a_local_training_killed_by_a_signal_resumes_where_its_checkpoint_left_it(
    trains, prefect_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("FINETUNE_POLL_S", "0.2")
    spec = _spec(tmp_path, "sft-tiny.yaml", "killed-local")
    run_dir = tmp_path / "runs" / "killed-local"
    killed = _kill_local_training_at(monkeypatch, run_dir, step=SAVE + LOG)
    with pytest.raises(Exception, match="signal 9|SIGKILL"):
        sft(spec=spec)
    assert killed
    report = json.loads((run_dir / "report.json").read_text())
    monitor = next(s for s in report["stages"] if s["stage"] == "monitor")
    assert monitor["status"] == "failed" and ("SIGKILL" in monitor["detail"] or "signal 9" in monitor["detail"])
    first_losses = report["job"]["losses"]

    from tasks.stages.training import ProgressReporter

    monkeypatch.setattr(ProgressReporter, "update", killed.real_update)  # type: ignore[attr-defined]
    _check_resumed(first_losses, sft(spec=spec), run_dir)


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_a_hugging_face_job_killed_mid_run_resumes_from_the_checkpoints_it_pushed(
    trains, prefect_server, jobs_env, tmp_path
):
    jobs_env.kill_next_jobs_at.append(f"pushed checkpoints at step {SAVE * 2}")
    spec = _spec(tmp_path, "sft-tiny-hf-jobs.yaml", "killed-hf")
    run_dir = tmp_path / "runs" / "killed-hf"
    with pytest.raises(Exception, match="signal 9"):
        sft(spec=spec)
    report = json.loads((run_dir / "report.json").read_text())
    first_losses = report["job"]["losses"]
    _check_resumed(first_losses, sft(spec=spec), run_dir)
    assert jobs_env.counts["create_job"] == 2


def test_a_killed_flow_leaves_its_training_running_and_the_next_run_takes_it_over(
    trains, prefect_server, prefect_database, tmp_path
):
    """The orchestrator dies, the training does not: the next run of the same name follows
    that training to its end instead of starting a second one. The flow's temporary Prefect
    server dies with it; after the second run, nothing the first one started is left."""
    import subprocess
    import sys
    import time

    import yaml

    spec = _spec(tmp_path, "sft-tiny.yaml", "killed-flow")
    spec_file = tmp_path / "killed-flow.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))  # type: ignore[attr-defined]
    run_dir = tmp_path / "runs" / "killed-flow"
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own temporary server
    home = seed_prefect_home(tmp_path / "prefect-home", prefect_database)
    env |= {"PREFECT_HOME": str(home), "FINETUNE_TEST_MARK": mark}
    flow = subprocess.Popen(
        [sys.executable, "-m", "flows.sft", "--spec", str(spec_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = run_dir / "logs" / "train.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and '"event": "log"' in log.read_text()) and time.monotonic() < deadline:
        assert flow.poll() is None, "the flow ended before its training got going"
        time.sleep(0.2)
    assert any("uvicorn" in c for c in marked_processes(mark).values()), "the flow started no temporary server"
    flow.kill()  # SIGKILL: no clean-up of any kind
    flow.wait(timeout=30)
    handle = load_handle(run_dir)
    assert handle is not None and handle.pid is not None
    training = {handle.pid, *descendants(handle.pid)}
    assert not wait_until_gone(mark, keep=training), "the killed flow left its temporary server running"

    summary = sft(spec=spec)
    assert summary.error is None and summary.job.job_id == handle.job_id  # type: ignore[attr-defined]
    assert log.read_text().count("training finished:") == 1, "one training, never two"
    assert [p.step for p in summary.job.losses] == list(range(LOG, STEPS + 1, LOG))  # type: ignore[attr-defined]
    assert not wait_until_gone(mark, keep=set()), "processes of the killed run outlived the run that took it over"


def test_a_checkpoint_cut_off_while_saving_is_not_resumed_from(tmp_path):
    """The Trainer writes trainer_state.json last; a job killed before that leaves a folder the
    script must not resume from (transformers refuses it: "Can't find a valid checkpoint")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_template", REPO / "training" / "templates" / "train.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)  # type: ignore[union-attr]
    done, cut, torn = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8", tmp_path / "checkpoint-12"
    for folder in (done, cut, torn):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
    (done / "trainer_state.json").write_text('{"global_step": 4}')
    (torn / "trainer_state.json").write_text('{"global_st')
    assert template.checkpoint_complete(done)
    assert not template.checkpoint_complete(cut) and not template.checkpoint_complete(torn)


def test_a_checkpoint_is_complete_only_when_every_process_has_written_its_part(tmp_path):
    """With several processes the main one writes trainer_state.json without waiting for the
    others: their random states (and, under FSDP, their shards) may still be on their way. Found
    in CI: a launcher killed just after trainer_state.json left process 1's random state cut short,
    and the resume died on it."""
    import importlib.util

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("train_template", REPO / "training" / "templates" / "train.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)  # type: ignore[union-attr]
    template.CONFIG = {"launch": {"processes": 2}}

    def checkpoint(name: str) -> Path:
        folder = tmp_path / name
        (folder / "pytorch_model_fsdp_0").mkdir(parents=True)
        for rank in (0, 1):  # what the Trainer saves: numpy's state among them
            torch.save({"python": rank, "numpy": np.random.get_state()}, folder / f"rng_state_{rank}.pth")
            (folder / "pytorch_model_fsdp_0" / f"__{rank}_0.distcp").write_bytes(b"shard")
        (folder / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"meta")
        (folder / "trainer_state.json").write_text('{"global_step": 8}')
        return folder

    assert template.checkpoint_complete(checkpoint("whole"))
    torn = checkpoint("torn")
    (torn / "rng_state_1.pth").write_bytes((torn / "rng_state_1.pth").read_bytes()[:20])
    missing = checkpoint("missing")
    (missing / "rng_state_1.pth").unlink()
    unsealed = checkpoint("unsealed")
    (unsealed / "pytorch_model_fsdp_0" / ".metadata").unlink()
    for folder in (torn, missing, unsealed):
        assert not template.checkpoint_complete(folder), folder.name


def test_a_killed_launcher_takes_its_training_processes_with_it(trains, tmp_path):
    """`accelerate launch` (torchrun's agent) starts the training processes in sessions of their
    own: SIGKILL of the launcher alone used to leave them training into the run folder. Each
    launched process now ends with its launcher."""
    import subprocess
    import sys
    import time

    from flows.planning import plan_run

    spec = load_spec(EXAMPLES / "sft-two-processes.yaml", {"name": "killed-launcher", "training": {"max_steps": 400}})
    plan = plan_run(spec)  # type: ignore[arg-type]
    run_dir = Path(plan.run_dir)
    log = (run_dir / "by-hand.log").open("wb")
    launcher = subprocess.Popen([sys.executable, "train.py"], cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while (
        len(trainers := descendants(launcher.pid)) < 2
        or "FINETUNE_PROGRESS" not in (run_dir / "by-hand.log").read_text()
    ):
        assert launcher.poll() is None and time.monotonic() < deadline, (run_dir / "by-hand.log").read_text()[-2000:]
        time.sleep(0.2)
    launcher.kill()  # the launcher alone, as the OOM killer or a lost node would
    launcher.wait()
    deadline = time.monotonic() + 30
    while [p for p in trainers if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in trainers if pid_alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "training processes outlived their launcher"


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_the_fsdp_path_of_the_script_shards_its_checkpoints_and_resumes_on_this_cpu(trains, tmp_path):
    """The script and accelerate.yaml a GPU machine's FSDP plan gets, run here on 2 CPU processes:
    accelerate 1.15 will not shard on a CPU (the plan refuses fsdp there), so tests/cpu_fsdp lends
    it the one branch it lacks; everything else is the generated script as written. Killed after a
    checkpoint, it resumes from its shards; the saved model is gathered whole and loads anywhere."""
    import subprocess
    import sys
    import time

    from flows.planning import plan_run
    from tasks.core.methods import method_definition
    from tasks.plan.launch import accelerate_config
    from tasks.stages.planning import build_script_task

    overrides = {"name": "fsdp-cpu", "training": {"max_steps": 16, "save_steps": 4, "logging_steps": 2}}
    plan = plan_run(load_spec(EXAMPLES / "sft-two-processes.yaml", overrides))  # type: ignore[arg-type]
    sharded = plan.hardware.model_copy(update={"strategy": "fsdp"})  # what a GPU machine's plan says
    launch = {**plan.script.config["launch"], "strategy": "fsdp", "accelerate": accelerate_config(sharded)}
    run_dir = Path(plan.run_dir)
    build_script_task(method_definition("sft"), {**plan.script.config, "launch": launch}, run_dir)
    assert yaml.safe_load((run_dir / "accelerate.yaml").read_text())["distributed_type"] == "FSDP"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "cpu_fsdp"), "FINETUNE_TEST_CPU_FSDP": "1"}

    def run(until: Path | None) -> str:
        log_path = run_dir / f"by-hand-{'killed' if until else 'resumed'}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "train.py"], cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if until is not None and until.exists():
                proc.kill()  # the launcher; its training processes end with it
                break
            time.sleep(0.1)
        proc.wait(timeout=60)
        return log_path.read_text()

    first = run(run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json")
    assert first.count("cpu-fsdp shim: FSDP2 on the CPU over gloo") == 2, first[-3000:]
    shards = run_dir / "checkpoints" / "checkpoint-4"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (shards / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    second = run(None)
    resumed = second.split("resuming from")[1].split("\n")[0] if "resuming from" in second else second[-3000:]
    # from checkpoint-8, or, when the kill caught process 1 still writing its part of it, from checkpoint-4
    assert "checkpoint-8" in resumed or ("checkpoint-4" in resumed and "removing the incomplete checkpoint-8" in second)
    assert "process 0 of 2 trained 16" in second and "process 1 of 2 trained 16" in second
    assert json.loads((run_dir / "train_result.json").read_text())["global_step"] == 16

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # whole, without accelerate
    assert sum(p.numel() for p in model.parameters()) == plan.hardware.parameters
