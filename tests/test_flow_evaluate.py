"""The before/after verdict on real training runs of the tiny model: a learning rate of 0 is
no change, and a run that harms a competent model is worse and publishes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.planning import plan_run
from flows.sft import sft
from tasks.core.spec import load_spec, parse_spec
from tasks.evaluate.verdict import evaluate
from tasks.stages.approval import PublishStopped
from tests.helpers import EXAMPLES, when_paused

CHAT = EXAMPLES / "data" / "sft_chat.jsonl"


def _train_by_hand(spec, out: Path, max_steps: int | None = None) -> Path:
    plan = plan_run(spec)
    command = [sys.executable, plan.script.path, "--output-dir", str(out)]
    command += ["--max-steps", str(max_steps)] if max_steps else []
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_a_learning_rate_of_zero_is_no_change(trains, tmp_path):
    spec = load_spec(
        EXAMPLES / "sft-tiny.yaml",
        {"name": "lr0", "training": {"learning_rate": 0.0}, "outputs": {"hub_repo": None, "gguf": []}},
    )
    out = _train_by_hand(spec, tmp_path / "lr0", max_steps=4)
    result = evaluate(out, "sft", 2.0)
    assert result.verdict == "no change" and result.change == 0 and result.rows == 20
    assert [g.base for g in result.generations] == [g.trained for g in result.generations]


def test_a_run_that_harms_a_competent_model_is_worse_and_publishes_nothing(sft_run, trains, prefect_server, tmp_path):
    # a competent base: the demo's training on the clean rows (the session's shared run, read only)
    base = Path(sft_run.summary.run_dir)
    # the harmful data: every question answered with the same useless words (answers shuffled
    # between rows keep the "a + b = c" form and moved the held-out loss within noise: measured)
    rows = [json.loads(line) for line in CHAT.read_text().splitlines()]
    useless = {"role": "assistant", "content": "no idea, sorry"}
    shuffled = tmp_path / "useless.jsonl"
    shuffled.write_text("".join(json.dumps({"messages": r["messages"][:-1] + [useless]}) + "\n" for r in rows))
    published = tmp_path / "published"
    spec = parse_spec(
        {
            "name": "harmful",
            "model": str(base / "model"),
            "dataset": str(shuffled),
            "lora": False,
            "evaluation": {"dataset": str(CHAT)},  # judged on the clean rows
            "training": {"learning_rate": 3e-3, "max_steps": 30, "per_device_train_batch_size": 8, "max_length": 128},
            "budget": {"max_usd": 5, "auto_approve_usd": 1},
            "outputs": {"hub_repo": str(published), "gguf": ["q8_0"]},
        }
    )
    from flows.approve import main as answer
    from tasks.core.rundir import runs_root

    # with a server, a person decides: declined, nothing is published
    from tasks.run.jobs import run_state

    answered, seen = [], []

    def decline(fid) -> None:
        seen.append(run_state(runs_root() / "harmful"))  # what another terminal sees while it waits
        answered.append(answer(["harmful", "--reject", "--reason", "not this one"]))

    when_paused(decline, within_s=900)  # the harmful run trains first (minutes on a busy machine)
    with pytest.raises(PublishStopped, match="worse than its base.*Nothing was published.*declined: not this one"):
        sft(spec=spec, approval_timeout_s=900)
    assert answered == [0]
    assert (seen[0]["state"], seen[0]["stage"]) == ("paused", "evaluate")
    assert seen[0]["answer"] == "python -m flows.approve harmful --publish|--reject"
    report = json.loads((runs_root() / "harmful" / "report.json").read_text())
    assert report["evaluation"]["verdict"] == "worse" and report["evaluation"]["rows"] == 64
    assert report["error_code"] == "regression" and "max_regression: null" in report["error_fix"]
    stages = {s["stage"]: s["status"] for s in report["stages"]}
    assert stages["evaluate"] == "failed" and stages["convert_gguf"] == stages["push_to_hub"] == "not run"
    assert not published.exists()
    assert "**Verdict: worse.**" in (runs_root() / "harmful" / "report.md").read_text()

    # the same run again (its training reused): this time the person publishes it anyway
    when_paused(lambda fid: answer(["harmful", "--publish", "--reason", "known trade-off"]), within_s=900)
    summary = sft(spec=spec, approval_timeout_s=900)
    evaluate_stage = next(s for s in summary.stages if s.stage == "evaluate")
    assert evaluate_stage.status == "passed" and "published anyway: known trade-off" in evaluate_stage.detail
    assert summary.stages[-1].status == "passed" and (published / "README.md").exists()


def test_without_anyone_to_ask_a_regression_stops_the_publish(monkeypatch, tmp_path):
    import tasks.stages.approval as approval

    monkeypatch.setattr(approval, "has_api_server", lambda: False)
    with pytest.raises(PublishStopped, match="worse"):
        approval.request_publish_decision("the trained model is worse", "r", tmp_path, 5, interactive=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    decided = approval.request_publish_decision("the trained model is worse", "r", tmp_path, 5, interactive=True)
    assert decided == "published anyway: decided at the terminal"
