"""Shared fixtures: every test runs with its own run folder and Prefect home, and the
tiny model is built once per session into a temporary cache.

Markers come from the fixtures a test uses, so they cannot drift from what it does:
`server` (a Prefect server: `prefect_server`, `served`, `own_server`), `train` (it trains the tiny model:
`trains`, `sft_run`) and `browser` (headless Chromium: `browser`). `make test-fast` runs the
tests with none of them. Tests that share one expensive session fixture are put in one
xdist group, so that under `pytest -n` only one worker builds it."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


def _thread_share() -> int:
    """The cores one xdist worker may use: every process started from it (training jobs, served
    flows, llama.cpp) inherits this share. Left to themselves, each process starts one OpenMP
    thread per core, and four workers' trainings spin-wait against each other: four demo
    lifecycles at once on 2 cores took 260 s instead of 113 s (benchmarks/results/thread-share.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, cores // workers)


# planning does not time the batch splits here (10-20 s a plan): the time model chooses, and
# tests/test_split_probe.py turns the probe on where it is what is tested
os.environ["FINETUNE_SPLIT_PROBE"] = "0"

# read when torch is imported, so set first
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_thread_share())
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finetune-tests-hf-home-")  # no user token file
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="finetune-tests-prefect-home-")
for _home in (os.environ["HF_HOME"], os.environ["PREFECT_HOME"]):  # nothing left in /tmp afterwards
    atexit.register(shutil.rmtree, _home, ignore_errors=True)


# workers and `serve` started by a test poll for runs every second instead of every 10 s
FAST_POLLS = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache folder (tiny models, measured architectures, TRL's config fields), one for all
    xdist workers of the session: everything in it is written whole by one writer and renamed
    into place, and keyed by what it was made from, so the workers share the work instead of
    each building the tiny models and measuring the same architectures again."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "cache"  # the session's, not the next one's
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tiny_cache))
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_CALIBRATION_FILE", str(tmp_path / "calibration.json"))  # each test starts uncorrected
    monkeypatch.delenv("HF_DEBUG", raising=False)
    for name, value in FAST_POLLS.items():
        monkeypatch.setenv(name, value)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_path(tiny_cache: Path) -> str:
    from training.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(tiny_cache))


@pytest.fixture(scope="session")
def tiny_vlm_path(tiny_cache: Path) -> str:
    """The tiny vision-language default, built once: its tests share one xdist worker (`vision`)."""
    from training.tiny_vlm import ensure_tiny_vlm

    return str(ensure_tiny_vlm(tiny_cache))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path: str):
    from tasks.core.model_source import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect database with every migration applied, built once for all xdist workers. A server
    started on an empty database spends 7 of its 12 CPU-seconds of start-up migrating it, and the
    suite starts six; each starts from a copy of this one instead (the migrations still run, and
    find nothing to do)."""
    from importlib.metadata import version

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the workers' common folder
    template = shared / f"prefect-{version('prefect')}.db"
    with FileLock(str(template) + ".lock"):
        if not template.exists():
            building = template.with_suffix(".building")
            env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{building}"}
            args = [sys.executable, "-m", "prefect", "--no-prompt", "server", "database", "upgrade", "-y"]
            subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)
            building.replace(template)
    return template


@pytest.fixture(scope="session")
def prefect_server(prefect_database: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One real Prefect server for the whole session (flows and pauses need one)."""
    import prefect.testing.utilities as harness

    seeded = tmp_path_factory.mktemp("prefect-server")
    shutil.copy(prefect_database, seeded / "prefect-test.db")  # the file name the harness opens
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "mkdtemp", lambda: str(seeded))  # where the harness puts its database
        with harness.prefect_test_harness(server_startup_timeout=60):
            mp.undo()
            yield


from tests.helpers import EXAMPLES, SFT_SECRET, process_env, start_process, stop_process, wait_for_deployments  # noqa: E402


@dataclass(frozen=True)
class Served:
    log: Path
    runs: Path
    calibration: Path


@pytest.fixture(scope="module")
def serve_process(prefect_server, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`python -m deployments.serve` as the README starts it, once per test module, with run
    folders of its own (each test's runs have names of their own)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:  # a deployment from `prefect deploy` keeps its pool and pull steps
        for deployment in client.read_deployments():
            client.delete_deployment(deployment.id)
    home = tmp_path_factory.mktemp("served")
    served = Served(log=home / "serve.log", runs=home / "runs", calibration=home / "calibration.json")
    env = {
        **process_env(),
        "FINETUNE_CACHE_DIR": str(tiny_cache),
        "FINETUNE_RUNS_DIR": str(served.runs),
        "FINETUNE_CALIBRATION_FILE": str(served.calibration),
        **FAST_POLLS,
    }
    env.pop("HF_TOKEN", None)
    proc = start_process([sys.executable, "-m", "deployments.serve"], served.log, env=env)
    try:
        wait_for_deployments({"sft/sft", "dpo/dpo", "grpo/grpo", "recipe/recipe"}, proc, served.log)
        yield served
    finally:
        stop_process(proc)


@pytest.fixture
def served(serve_process: Served, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's served deployments; the test sees the served runs' folder. Yields the log."""
    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(serve_process.runs))
    monkeypatch.setenv("FINETUNE_CALIBRATION_FILE", str(serve_process.calibration))
    return serve_process.log


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


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits between attempts, recorded instead of slept: ours, and huggingface_hub's own
    backoff, which downloads go through (it honours Retry-After too)."""
    import types

    from huggingface_hub.utils import _http

    from tasks.core import faults

    recorded: list[float] = []
    monkeypatch.setattr(faults, "pause", recorded.append)
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = recorded.append
    monkeypatch.setattr(_http, "time", fake_time)
    return recorded


# -- what a test does, said by a fixture: the markers below are derived from these ------------
@pytest.fixture
def trains() -> None:
    """Requested by a test that trains the tiny model itself (through a flow or its script)."""


@pytest.fixture
def own_server() -> None:
    """Requested by a test that starts a Prefect server of its own (as a user would)."""


@dataclass(frozen=True)
class SftRun:
    summary: object  # flows.sft's RunSummary
    runs: Path  # FINETUNE_RUNS_DIR it ran under
    published: Path  # its local publish target
    elapsed_s: float


@pytest.fixture(scope="session")
def sft_run(prefect_server, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> SftRun:
    """The demo's SFT (examples/sft-tiny.yaml) through the whole lifecycle, trained once for the
    tests that only read it, in folders of its own. Those tests must not change it."""
    from flows.sft import sft
    from tasks.core.spec import load_spec

    home = tmp_path_factory.mktemp("sft-run")
    published = home / "published" / "tiny-sft"
    with pytest.MonkeyPatch.context() as mp:  # the environment of this training only
        mp.setenv("FINETUNE_CACHE_DIR", str(tiny_cache))
        mp.setenv("FINETUNE_RUNS_DIR", str(home / "runs"))
        mp.setenv("FINETUNE_CALIBRATION_FILE", str(home / "calibration.json"))
        mp.setenv("HF_TOKEN", SFT_SECRET)
        start = time.monotonic()
        spec = load_spec(
            EXAMPLES / "sft-tiny.yaml", {"name": "flow-test", "outputs": {"hub_repo": f"file://{published}"}}
        )
        summary = sft(spec=spec)
        elapsed = time.monotonic() - start
    return SftRun(summary=summary, runs=home / "runs", published=published, elapsed_s=elapsed)


@pytest.fixture(scope="session")
def browser() -> str:
    """Debian's Chromium, driven through Playwright; the test is skipped where either is missing
    (`.ci/run` installs chromium)."""
    pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which(chromium):
        pytest.skip("no Chromium here (apt-get install chromium)")
    return chromium


MARKERS_FROM_FIXTURES = {
    "server": {"prefect_server", "served", "own_server"},
    "train": {"trains", "sft_run"},
    "browser": {"browser"},
}
# tests sharing an expensive fixture run on one xdist worker (`--dist loadgroup`): the session's
# trained run, a module's served deployments (one `deployments.serve` per module, not per worker),
# and the tiny vision-language model (built once)
GROUPS_FROM_FIXTURES = {"sft_run": "sft_run", "served": "served-{module}", "tiny_vlm_path": "vision"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))  # with every fixture they depend on
        for marker, fixtures in MARKERS_FROM_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)
        for fixture, group in GROUPS_FROM_FIXTURES.items():
            if fixture in used and not item.get_closest_marker("xdist_group"):
                item.add_marker(pytest.mark.xdist_group(group.format(module=item.module.__name__)))
    # the modules that train first, then those with a server, then the rest (each module's tests
    # stay together and in order): under xdist the long tests start early instead of ending last
    rank: dict[str, int] = {}
    for item in items:
        mine = 0 if item.get_closest_marker("train") else 1 if item.get_closest_marker("server") else 2
        rank[item.module.__name__] = min(rank.get(item.module.__name__, 2), mine)
    items.sort(key=lambda item: rank[item.module.__name__])


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under `--dist loadgroup` a grouped test carries its group in its node id; where it does
    not, xdist no longer groups (pytest-xdist#1386, with pytest 9.2) and every worker would
    build the shared run again: the test fails and says so instead of silently doubling work."""
    if item.config.getoption("loadgroup", False) and item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail(f"--dist loadgroup did not group {item.nodeid}: see the pytest pin in pyproject.toml")
