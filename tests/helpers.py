"""Helpers shared by the test files; fixtures are in conftest.py. A test file imports from here
(or from the stand-ins, hub_standin.py and jobs_standin.py, and processes.py, which
docs/take_screenshots.py imports too), never from another test file.

Waiting: a test that waits for something another process or thread does waits on that thing
(`wait_until`), with a generous timeout that only a hang reaches; it never sleeps a fixed time
and hopes the work is done."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.processes import stop_process

__all__ = ["stop_process"]  # re-exported for the tests

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CHAT = str(EXAMPLES / "data" / "sft_chat.jsonl")
CONFIGS = REPO / "tests" / "data" / "configs"

T = TypeVar("T")

SFT_SECRET = "hf_" + "S3cretT0ken" * 3  # set while the shared SFT run trains (conftest.sft_run); in none of its files


def wait_until(check: Callable[[], T], timeout_s: float = 120, what: str = "", poll_s: float = 0.1) -> T:
    """Polls `check` until it returns something true and returns that; fails after `timeout_s`
    (a hang, not a slow machine: the timeouts are generous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what or check}")
        time.sleep(poll_s)


# -- processes a user starts beside a server --------------------------------------------------
def api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def seed_prefect_home(home: Path, database: Path) -> Path:
    """A PREFECT_HOME whose database is already migrated (conftest's `prefect_database`), for a
    test that starts `prefect server start` as a user does."""
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(database, home / "prefect.db")
    return home


def process_env() -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url(), "FINETUNE_FLOW_HOME": str(REPO)}


def start_process(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            args,
            cwd=REPO,
            env=env or process_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_deployments(names: set[str], proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:

        def served() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return names <= {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}

        wait_until(served, timeout_s, f"deployments {names} (log: {log})", poll_s=0.5)


# -- runs started through the deployment doors (REST, MCP, UI) ---------------------------------
QUICK_SFT = {
    "method": "sft",
    "model": "tiny",
    "dataset": CHAT,
    "training": {"max_steps": 6, "learning_rate": 3.0e-3, "per_device_train_batch_size": 8, "max_length": 96},
    "evaluation": {"generations": 0},
    "outputs": {"gguf": []},
}
# This machine at a price, as a team prices its own GPU box: a few tenths of a cent per run,
# above an auto-approval of 0, so the run pauses for a person (or an agent's user).
PRICED = {"flavors": {"local-cpu": {"price_per_hour": 2.0}}, "budget": {"max_usd": 2, "auto_approve_usd": 0}}

MCP_TOOLS = {
    "validate_dataset",
    "plan_run",
    "start_run",
    "run_status",
    "approve_run",
    "run_logs",
    "cancel_run",
    "run_results",
}


def when_paused(action: Callable[[Any], object], within_s: float = 300) -> threading.Thread:
    """Runs `action(flow_run_id)` in a thread once a flow run is paused (within `within_s`)."""

    def run() -> None:
        from prefect import get_client

        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                paused = [r for r in client.read_flow_runs() if r.state and r.state.is_paused()]
            if paused:
                action(paused[0].id)
                return
            time.sleep(0.5)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- planning inputs, worked by hand ----------------------------------------------------------
def hf_config(name: str):
    """A config.json of tests/data/configs as transformers reads it."""
    from transformers import AutoConfig

    data = json.loads((CONFIGS / f"{name}.json").read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def dataset_report(rows: int = 10_000, mean: float = 512, longest: int = 1024):
    from tasks.core.models import DatasetReport, TokenStats

    return DatasetReport(
        source="x",
        split="train",
        format="messages",
        rows=rows,
        columns=["messages"],
        column_mapping={},
        tokens=TokenStats(min=10, max=longest, mean=mean, p50=int(mean), p95=longest),
        total_tokens=int(rows * mean),
        max_length=1024,
        rows_over_max_length=0,
        duplicates=0,
        empty_turns=0,
        warnings=[],
        prepared_path="x",
        train_rows=rows,
        heldout_path="y",
    )


def chat_spec(**kw):
    from tasks.core.spec import parse_spec

    return parse_spec({"dataset": CHAT, "outputs": {"gguf": []}, **kw})


def sft_args(**over):
    from tasks.core.methods import SFT, base_arguments

    return base_arguments(SFT, {"max_length": 1024, "per_device_train_batch_size": 4, **over})


def cost_estimate(usd: float):
    from tasks.core.models import CostEstimate

    return CostEstimate(
        flavor="x",
        price_per_hour_usd=1,
        tokens=1,
        estimated_flops=1,
        utilisation=0.3,
        startup_s=0,
        hours=usd,
        hours_low=usd * 0.75,
        hours_high=usd * 1.5,
        usd=usd,
        usd_low=usd * 0.75,
        usd_high=usd * 1.5,
        basis="test",
    )


# -- jobs on the Jobs stand-in ----------------------------------------------------------------
def job_request(tmp_path: Path, body: str, name: str | None = None, timeout_s: int = 120):
    """A run folder whose train.py is `body`: enough for a backend, without training.
    Each test's run has its own name (the stand-in lives for the whole session)."""
    from tasks.core.models import TrainingScript
    from tasks.run.backends import JobRequest

    name = name or re.sub(r"[^a-z0-9-]", "-", tmp_path.name.lower())[-40:].strip("-")
    run_dir = tmp_path / "runs" / name
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "train.jsonl").write_text('{"text": "1 + 1 = 2"}\n')
    script = run_dir / "train.py"
    script.write_text(textwrap.dedent(body))
    return JobRequest(
        run_name=name,
        run_dir=str(run_dir),
        script=TrainingScript(path=str(script), sha256=str(hash(body)), method="sft", trainer="SFTTrainer", config={}),
        model_path="Qwen/Qwen2.5-0.5B",
        flavor="cpu-basic",
        timeout_s=timeout_s,
    )
