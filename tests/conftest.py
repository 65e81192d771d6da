"""Shared fixtures: every test runs with its own run folder and Prefect home, and the
tiny model is built once per session into a temporary cache."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Hermetic: nothing from the user's shell may change what the tests see. These are read at
# import time by huggingface_hub and Prefect, so they are cleared before either is imported;
# each test sets what it needs.
for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "HF_DEBUG",
    "HF_HUB_DISABLE_XET",
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_PROFILE",
    "FINETUNE_HF_TOKEN_BLOCK",
    "FINETUNE_FLAVORS_FILE",
    "FINETUNE_POLL_S",
    "FINETUNE_HUB_XET",
    *(p for p in os.environ if p.lower() in ("http_proxy", "https_proxy", "all_proxy")),
):
    os.environ.pop(_name, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finetune-tests-hf-home-")  # no user token file
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="finetune-tests-prefect-home-")
for _home in (os.environ["HF_HOME"], os.environ["PREFECT_HOME"]):  # nothing left in /tmp afterwards
    atexit.register(shutil.rmtree, _home, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tiny_cache))
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_CALIBRATION_FILE", str(tmp_path / "calibration.json"))  # each test starts uncorrected
    monkeypatch.delenv("HF_DEBUG", raising=False)
    # workers and `serve` started by a test poll for runs every second instead of every 10 s
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
    monkeypatch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "1")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_path(tiny_cache: Path) -> str:
    from training.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(tiny_cache))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path: str):
    from tasks.core.model_source import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One real Prefect server for the whole session (flows and pauses need one)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


# -- the deployment doors: processes a user starts beside a server ----------------------------
from tests.processes import stop_process  # noqa: E402  (re-exported for the tests)


def api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def process_env() -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url(), "FINETUNE_FLOW_HOME": str(REPO)}


def start_process(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            args, cwd=REPO, env=process_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for_deployments(names: set[str], proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            found = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
            if names <= found:
                return
            time.sleep(1)
    raise AssertionError(f"deployments {names} did not appear: {log.read_text()[-3000:]}")


@pytest.fixture
def served(prefect_server, tmp_path: Path) -> Iterator[Path]:
    """`python -m deployments.serve` as the README starts it; yields its log."""
    from prefect import get_client

    with get_client(sync_client=True) as client:  # a deployment from `prefect deploy` keeps its pool and pull steps
        for deployment in client.read_deployments():
            client.delete_deployment(deployment.id)
    log = tmp_path / "serve.log"
    proc = start_process([sys.executable, "-m", "deployments.serve"], log)
    try:
        _wait_for_deployments({"sft/sft", "dpo/dpo", "grpo/grpo", "recipe/recipe"}, proc, log)
        yield log
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def jobs_standin() -> Iterator[object]:
    """One executing stand-in of the Hub and Jobs API for the session (tests/jobs_standin.py)."""
    from tests.jobs_standin import STANDIN_TOKEN, JobsStandin

    with JobsStandin(require_token=STANDIN_TOKEN, schedule_s=0.2) as server:
        yield server


@pytest.fixture
def jobs_env(jobs_standin, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """huggingface_hub pointed at the stand-in, with its token; Xet restored afterwards."""
    import huggingface_hub.constants as constants

    from tests.jobs_standin import STANDIN_TOKEN

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    # downloads (hf_hub_download, through transformers) read the endpoint huggingface_hub saw at import
    monkeypatch.setattr(constants, "ENDPOINT", jobs_standin.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", jobs_standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setenv("HF_ENDPOINT", jobs_standin.endpoint)
    import datasets.config  # it too reads the endpoint once, at import

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", jobs_standin.endpoint)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", jobs_standin.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setenv("HF_TOKEN", STANDIN_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("FINETUNE_POLL_S", "0.5")
    jobs_standin.can_pay = True
    jobs_standin.fail_next_jobs.clear()
    jobs_standin.kill_next_jobs_at.clear()
    jobs_standin.reset_counters()
    jobs_standin.clear_faults()
    yield jobs_standin
    jobs_standin.clear_faults()
