"""Fault injection on every network stage: transient faults are retried (and a server's
Retry-After honoured), permanent ones fail at once with what to do.

Each case drives the real huggingface_hub client against the Hub and Jobs stand-in, which
answers the stage's request with the injected fault; no call is mocked."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.core import faults
from tasks.core.faults import kind_of, retry_after_s
from tasks.core.hub_access import make_api
from tasks.core.model_source import ModelSourceError, load_config
from tasks.data.reading import DatasetLoadError, load_frame
from tasks.export.hub import PublishError, publish_to_hub
from tasks.run.backends import BackendError
from tasks.run.backends.hf_jobs import HfJobsBackend
from tests.helpers import job_request, wait_until
from tests.jobs_standin import STANDIN_TOKEN

pytestmark = pytest.mark.usefixtures("jobs_env")

NS = "standin-user"


@dataclass(frozen=True)
class Stage:
    """One network stage: what it needs set up (without faults), the request its faults are
    injected into, and the call that meets them."""

    route: str
    prepare: Callable[[Path, str], Any]  # (tmp_path, case id) -> what `run` needs
    run: Callable[[Any], object]
    refusal: type[Exception]


def _backend() -> HfJobsBackend:
    return HfJobsBackend(retry_delays_s=(0.5, 1.0, 2.0))


def _hub_model(tmp_path: Path, case: str) -> str:
    """A Hub model of its own per case, so nothing cached can stand in for the download."""
    repo = f"{NS}/model-{case}"
    api = make_api(STANDIN_TOKEN)
    api.create_repo(repo, exist_ok=True)
    api.upload_file(
        path_or_fileobj=json.dumps({"model_type": "gpt2"}).encode(), path_in_repo="config.json", repo_id=repo
    )
    return repo


def _hub_dataset(tmp_path: Path, case: str) -> str:
    repo = f"{NS}/data-{case}"
    api = make_api(STANDIN_TOKEN)
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.upload_file(
        path_or_fileobj=b'{"text": "1 + 1 = 2"}\n', path_in_repo="train.jsonl", repo_id=repo, repo_type="dataset"
    )
    return repo


def _finished_job(tmp_path: Path, case: str) -> Any:
    """A job that ran and pushed a train_result.json; ended before any fault is injected, so
    the job's own downloads cannot take the fault."""
    backend = HfJobsBackend(retry_delays_s=())
    handle = backend.submit(job_request(tmp_path, "print('hi')\n", name=f"fault-{case}"))
    wait_until(lambda: backend.status(handle).state in ("completed", "failed"), 300, f"job {handle.job_id} to end")
    make_api(STANDIN_TOKEN).upload_file(
        path_or_fileobj=b'{"train_loss": 1.0}', path_in_repo="train_result.json", repo_id=handle.staging_repo
    )
    return handle


def _fetch(handle: Any) -> object:
    _backend().fetch(handle)
    return json.loads((Path(handle.run_dir) / "train_result.json").read_text())


def _release(tmp_path: Path, case: str) -> tuple[Path, str]:
    release = tmp_path / "release"
    release.mkdir()
    (release / "README.md").write_text("# model\n")
    return release, f"{NS}/published-{case}"


STAGES = {
    "plan (Hub model)": Stage(f"GET /{NS}/model-", _hub_model, load_config, ModelSourceError),
    "plan (Hub dataset)": Stage(f"GET /api/datasets/{NS}/data-", _hub_dataset, load_frame, DatasetLoadError),
    "check_account": Stage(
        "GET /api/whoami-v2", lambda p, c: "cpu-basic", lambda flavor: _backend().preflight(flavor), BackendError
    ),
    "submit_job": Stage(
        "POST /api/jobs/",
        lambda p, c: job_request(p, "print('hi')\n", name=f"fault-{c}"),
        lambda request: _backend().submit(request),
        BackendError,
    ),
    "monitor": Stage(f"GET /api/jobs/{NS}/", _finished_job, lambda h: _backend().status(h), BackendError),
    "fetch_artifacts": Stage("/revision/", _finished_job, _fetch, BackendError),
    "push_to_hub": Stage(
        "/commit/", _release, lambda r: publish_to_hub(r[0], r[1], True, STANDIN_TOKEN, "publish"), PublishError
    ),
}

# What each permanent refusal must tell the user.
PERMANENT = {
    401: "401",
    403: "403",
    404: "404",
}


def _hits(standin: Any, route: str) -> int:
    return sum(1 for method, path, _ in standin.log if route in f"{method} {path}")


def _case(request: pytest.FixtureRequest) -> str:
    return request.node.callspec.id.replace(" ", "-").replace("(", "").replace(")", "").replace("_", "-").lower()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("fault", ["503", "connection reset", "429 with Retry-After"])
def test_a_transient_fault_is_retried_and_the_stage_succeeds(jobs_standin, tmp_path, waits, stage, fault, request):
    s = STAGES[stage]
    case = _case(request)
    prepared = s.prepare(tmp_path, case)
    jobs_standin.reset_counters()
    if fault == "503":
        jobs_standin.fail_next(s.route, 503)
    elif fault == "connection reset":
        jobs_standin.drop_next(s.route)
    else:
        jobs_standin.fail_next(s.route, 429, retry_after="7")
    assert s.run(prepared) is not None
    faulted = [status for method, path, status in jobs_standin.log if s.route in f"{method} {path}"]
    assert faulted[0] in (0, 503, 429) and faulted[-1] not in (0, 503, 429), faulted
    if fault != "connection reset":  # a cut download is resumed at once by huggingface_hub itself
        assert waits, "an answer of 429/503 is retried after a wait"
    if fault == "429 with Retry-After":
        assert max(waits) >= 7.0, f"the server asked for 7 s; waited {waits}"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("status", PERMANENT)
def test_a_permanent_refusal_fails_at_once_and_says_why(jobs_standin, tmp_path, waits, stage, status, request):
    s = STAGES[stage]
    case = _case(request)
    prepared = s.prepare(tmp_path, case)
    jobs_standin.reset_counters()
    jobs_standin.fail_next(s.route, status, times=5)
    with pytest.raises(s.refusal) as raised:
        s.run(prepared)
    assert _hits(jobs_standin, s.route) == 1, "a permanent refusal is never asked again"
    assert PERMANENT[status] in str(raised.value)
    assert STANDIN_TOKEN not in str(raised.value)


@pytest.mark.parametrize("stage", STAGES)
def test_offline_mode_fails_at_once_and_names_the_switch(jobs_standin, tmp_path, waits, stage, request, monkeypatch):
    import huggingface_hub.constants as constants

    s = STAGES[stage]
    case = _case(request)
    prepared = s.prepare(tmp_path, case)
    if stage.startswith("plan"):  # never downloaded: nothing in the local cache either
        prepared = f"{prepared}-never-downloaded"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs_standin.reset_counters()
    with pytest.raises(s.refusal) as raised:
        s.run(prepared)
    assert "HF_HUB_OFFLINE" in str(raised.value)
    assert not waits, "offline mode is not a network fault: nothing is retried"
    assert jobs_standin.log == [], "no request left this process"


def test_a_persistent_outage_gives_up_after_the_schedule_with_the_count(jobs_standin, tmp_path, waits):
    jobs_standin.fail_next("GET /api/whoami-v2", 503, times=10)
    with pytest.raises(BackendError, match=r"after 4 attempts"):
        _backend().preflight("cpu-basic")


class _Response:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status_code, self.headers = status, headers or {}


class _HTTPError(Exception):
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.response = _Response(status, headers)


def test_fault_kinds_read_the_whole_chain_and_retry_after_in_both_forms():
    assert kind_of(_HTTPError(503)) == kind_of(_HTTPError(429)) == kind_of(_HTTPError(408)) == "transient"
    assert kind_of(_HTTPError(401)) == kind_of(_HTTPError(404)) == kind_of(ValueError("bad row")) == "permanent"
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert kind_of(wrapped) == "transient"
    from datetime import UTC, datetime

    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s(_HTTPError(429, {"Retry-After": "12"})) == 12.0
    assert retry_after_s(_HTTPError(503, {"Retry-After": "Thu, 26 Nov 2026 12:00:30 GMT"}), now=now) == 30.0
    assert retry_after_s(_HTTPError(429, {"Retry-After": "86400"})) == faults.RETRY_AFTER_CAP_S
    assert retry_after_s(_HTTPError(429)) is None
