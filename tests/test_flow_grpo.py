"""GRPO through the shared pipeline: prompts keep their reward columns, rewards are checked
before any spend and travel inside the script, and the run logs its reward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.grpo import grpo
from tasks.data.validate import DatasetValidationError, validate_dataset
from tasks.methods import GRPO
from tasks.rewards import RewardError
from tasks.rundir import runs_root
from tasks.spec import load_spec
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow
SPEC = EXAMPLES / "grpo-tiny.yaml"


def test_prompt_rows_keep_their_reward_columns_and_bad_prompts_are_named(tiny_tokenizer, tmp_path):
    report = validate_dataset(str(EXAMPLES / "data" / "grpo_prompts.jsonl"), GRPO, tiny_tokenizer, 64, tmp_path)
    assert report.format == "prompt_only" and report.rows == 100
    first = json.loads(Path(report.prepared_path).read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "answer": "1"}
        )
        + "\n"
        + json.dumps({"prompt": "", "answer": "2"})
        + "\n"
    )
    with pytest.raises(DatasetValidationError) as e:
        validate_dataset(str(bad), GRPO, tiny_tokenizer, 64, tmp_path / "b")
    assert "rows 1: a conversational prompt must end with a user turn" in str(e.value)
    assert "rows 2: prompt must not be empty" in str(e.value)


def test_a_user_reward_that_raises_stops_the_run_before_submission(prefect_server, tmp_path):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def strict(completions, solution, **kw):\n    return [1.0] * len(completions)\n")
    spec = load_spec(SPEC, {"name": "grpo-bad-reward", "model": "tiny", "rewards": [f"{rewards}:strict"]})
    with pytest.raises(RewardError, match=r"strict' raised TypeError: .*solution"):
        grpo(spec=spec)
    assert not (runs_root() / "grpo-bad-reward" / "job.json").exists()


def test_the_grpo_example_runs_alone_and_chains_its_sft_warm_up(prefect_server, tmp_path):
    from tasks.run.monitor import read_trackio_metrics

    examples = tmp_path / "examples"  # a fresh copy: nothing published yet
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("published"))
    summary = grpo(spec=load_spec(examples / "grpo-tiny.yaml", {"name": "grpo-test"}))
    assert (examples / "published" / "sft-warmup-tiny" / "config.json").exists()  # the warm-up ran first
    assert (examples / "published" / "grpo-tiny" / "README.md").exists()  # paths resolve next to the spec
    assert summary.error is None and all(s.status == "passed" for s in summary.stages), summary.stages
    script = Path(summary.plan.script.path).read_text()
    assert "'trainer': 'GRPOTrainer'" in script and "def exact_answer(completions, answer" in script
    assert "from training" not in script and "import training" not in script
    rows = read_trackio_metrics(Path(summary.run_dir) / "trackio", "grpo-test", "grpo-test")
    logged = [r for r in rows if "train/reward" in r]
    rewards = [r["train/reward"] for r in logged]
    assert len(rewards) >= 10 and "train/rewards/exact_answer/mean" in logged[-1]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert end > start + 0.2, rewards
    assert summary.evaluation.verdict == "improved" and summary.evaluation.rows == 20, (
        summary.evaluation
    )  # measured here: 0.11 -> 1.03 (a learning-rate-0 control stays at 0.04-0.08)


def test_a_chained_spec_plans_before_its_model_exists_and_a_missing_folder_is_explained(tmp_path):
    from flows.pipeline import plan_run
    from tasks.model_source import ModelSourceError

    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("published"))
    plan = plan_run(load_spec(examples / "grpo-tiny.yaml", {"name": "grpo-plan"}))
    assert "sft-warmup-tiny" in plan.notes[0] and "does not exist yet" in plan.notes[0]
    alone = load_spec(examples / "grpo-tiny.yaml", {"name": "grpo-alone", "requires": []})
    with pytest.raises(ModelSourceError, match="does not exist.*relative to the spec file.*requires"):
        plan_run(alone)
