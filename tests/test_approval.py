"""Approval everywhere: automatic, paused for a typed answer (Python API, `flows.approve`,
REST), a timeout, a terminal prompt or a fast failure without a server, a command-line
pre-approval; all against a real local Prefect server started for the test session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tasks.core.rundir import runs_root
from tasks.core.spec import Budget
from tasks.stages.approval import NotApproved, request_approval
from tests.helpers import cost_estimate, when_paused

BUDGET = Budget(max_usd=20, auto_approve_usd=1)


def _gate(run_name: str, timeout_s: int = 60):
    from prefect import flow

    run_dir = runs_root() / run_name
    run_dir.mkdir(parents=True, exist_ok=True)

    @flow(name=f"gate-{run_name}")
    def gate():
        return request_approval(cost_estimate(5), BUDGET, run_name, run_dir, timeout_s, poll_s=1)

    return gate


def test_the_pause_takes_a_typed_answer_from_the_python_api(prefect_server):
    from prefect.flow_runs import resume_flow_run

    when_paused(lambda fid: resume_flow_run(fid, run_input={"approve": True, "reason": "looks fine", "max_usd": 12}))
    approval = _gate("api")()
    assert approval.by == "user" and approval.reason == "looks fine" and approval.max_usd == 12

    when_paused(lambda fid: resume_flow_run(fid, run_input={"approve": False, "reason": "too dear"}))
    with pytest.raises(NotApproved, match="too dear"):
        _gate("api-no")()


def test_the_command_line_approves_by_run_name(prefect_server, capsys):
    from flows.approve import main

    results = []
    when_paused(lambda fid: results.append(main(["cli", "--reason", "go ahead"])))
    approval = _gate("cli")()
    assert results == [0] and approval.reason == "go ahead"
    assert (runs_root() / "cli" / "approval.json").exists()
    assert "approved: flow run" in capsys.readouterr().out

    when_paused(lambda fid: main(["cli-no", "--reject", "--reason", "not now"]))
    with pytest.raises(NotApproved, match="not now"):
        _gate("cli-no")()


def test_the_rest_api_rejects_bad_input_and_accepts_good(prefect_server):
    import httpx
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    answers = []

    def resume(fid, run_input: dict) -> httpx.Response:
        # A busy SQLite server answers 503 ("Service Unavailable", retryable); Prefect's own
        # client retries it, and so must any REST client.
        for _ in range(20):
            answer = httpx.post(f"{api}/flow_runs/{fid}/resume", json={"run_input": run_input}, timeout=60)
            if answer.status_code != 503:
                return answer
            time.sleep(1)
        return answer

    def post(fid):
        bad = resume(fid, {"approve": "maybe not"})
        good = resume(fid, {"approve": True, "reason": "via REST"})
        answers.append((bad.status_code, bad.json().get("status"), good.status_code, good.json().get("status")))

    when_paused(post)
    approval = _gate("rest")()
    assert answers == [(200, "REJECT", 201, "ACCEPT")]  # an invalid answer is a 200 with REJECT
    assert approval.reason == "via REST"


def test_nobody_answering_stops_the_run_unapproved(prefect_server):
    start = time.monotonic()
    with pytest.raises(NotApproved, match="no approval within 3 s; the run was not started"):
        _gate("silent", timeout_s=3)()
    assert time.monotonic() - start < 30


def test_without_a_server_a_terminal_is_asked_and_a_script_fails_fast(monkeypatch, tmp_path):
    import tasks.stages.approval as approval

    monkeypatch.setattr(approval, "has_api_server", lambda: False)
    with pytest.raises(NotApproved, match=r"--approve-up-to 7.50"):
        request_approval(cost_estimate(5), BUDGET, "batch", tmp_path, 60, interactive=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert request_approval(cost_estimate(5), BUDGET, "tty", tmp_path, 60, interactive=True).by == "terminal"
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    with pytest.raises(NotApproved, match="declined at the terminal"):
        request_approval(cost_estimate(5), BUDGET, "tty", tmp_path, 60, interactive=True)


def test_a_command_line_pre_approval_covers_only_what_it_says(tmp_path):
    ok = request_approval(cost_estimate(5), BUDGET, "pre", tmp_path, 60, approve_up_to_usd=8)
    assert ok.by == "command line" and "--approve-up-to" in ok.reason
    with pytest.raises(NotApproved, match="above --approve-up-to"):
        request_approval(cost_estimate(5), BUDGET, "pre", tmp_path, 60, approve_up_to_usd=7)
    assert request_approval(cost_estimate(0.5), BUDGET, "pre", tmp_path, 60).by == "auto"


def test_a_cloud_run_without_a_token_stops_before_approval_and_before_any_upload(prefect_server, monkeypatch):
    from flows.sft import sft
    from tasks.core import hub_access
    from tasks.core.spec import parse_spec
    from tasks.run.backends import BackendError
    from tests.helpers import EXAMPLES

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_access, "stored_token", lambda: None)  # no `hf auth login` token either
    monkeypatch.setenv("FINETUNE_HF_TOKEN_BLOCK", "no-such-block")
    spec = parse_spec(
        {
            "dataset": str(EXAMPLES / "data" / "sft_chat.jsonl"),
            "backend": "hf-jobs",
            "name": "cloud-run",
            "training": {"max_length": 128},
            "outputs": {"gguf": []},
        }
    )
    with pytest.raises(BackendError, match="no Hugging Face token for backend hf-jobs: set HF_TOKEN"):
        sft(spec=spec)
    report = Path(runs_root() / "cloud-run" / "report.md").read_text()
    assert "| check_account | failed |" in report and "| approve | not run |" in report
    assert not (runs_root() / "cloud-run" / "job.json").exists()


def test_the_forms_have_labels_a_required_decision_and_a_plain_number():
    from tasks.stages.approval import ApprovalInput, PublishDecision

    schema = ApprovalInput.with_initial_data(description="x", max_usd=5.0).model_json_schema()
    assert "approve" in schema["required"] and schema["properties"]["approve"]["title"] == "Approve this spend"
    cap = schema["properties"]["max_usd"]
    assert (cap["type"], cap["default"], cap["title"]) == ("number", 5.0, "Spending cap (USD)")  # no "float | None"
    assert "publish" in PublishDecision.with_initial_data(description="x").model_json_schema()["required"]


def test_a_child_flow_run_pauses_and_is_answered_like_any_run(prefect_server):
    """A recipe's stages are child flow runs: their approval pauses where they are."""
    from prefect import flow
    from prefect.flow_runs import resume_flow_run

    gate = _gate("child")

    @flow(name="parent-of-child")
    def parent():
        return gate()

    when_paused(lambda fid: resume_flow_run(fid, run_input={"approve": True, "reason": "stage ok"}))
    approval = parent()
    assert approval.by == "user" and approval.reason == "stage ok" and approval.max_usd == BUDGET.max_usd
