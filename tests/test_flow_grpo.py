"""GRPO through the shared pipeline: prompts keep their reward columns and rewards are checked
before any spend (the example recipe's whole run, from its SFT warm-up, is in test_recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.grpo import grpo
from tasks.core.methods import GRPO
from tasks.core.recipe import load_recipe
from tasks.core.rundir import runs_root
from tasks.data.validate import DatasetValidationError, validate_dataset
from tasks.plan.rewards import RewardError
from tests.helpers import EXAMPLES

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
    grpo_stage = load_recipe(SPEC).stages[1]  # the example recipe's GRPO stage, from the tiny model
    spec = grpo_stage.model_copy(update={"name": "grpo-bad-reward", "rewards": [f"{rewards}:strict"]})
    with pytest.raises(RewardError, match=r"strict' raised TypeError: .*solution"):
        grpo(spec=spec)
    assert not (runs_root() / "grpo-bad-reward" / "job.json").exists()
