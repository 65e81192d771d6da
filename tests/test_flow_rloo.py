"""RLOO on the embedded default: GRPO's prompts and rewards, checked the same way before spend,
trained by TRL's RLOOTrainer; its plan counts the completions it generates and, with its KL
penalty on (TRL's default beta), a reference model."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.planning import plan_run
from flows.rloo import rloo
from tasks.core.spec import parse_spec
from tasks.plan.rewards import RewardError
from tests.helpers import EXAMPLES

PROMPTS = str(EXAMPLES / "data" / "grpo_prompts.jsonl")


def _spec(**over) -> dict:
    spec = {
        "method": "rloo",
        "model": "tiny",
        "dataset": PROMPTS,
        "rewards": ["exact_answer", "answer_format"],
        "lora": False,
        "training": {
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_completion_length": 8,
            "logging_steps": 2,
        },
        "evaluation": {"held_out": 8},
    }
    return {**spec, **over}


def test_the_rloo_plan_counts_generation_and_its_reference_model(tmp_path):
    plan = plan_run(parse_spec(_spec()), tmp_path)
    memory = plan.hardware.memory_breakdown_gb
    assert "generation kv cache" in memory and "reference model" in memory  # beta 0.05 by default: a KL penalty
    no_kl = plan_run(parse_spec(_spec(name="no-kl", training={**_spec()["training"], "beta": 0.0})), tmp_path)
    assert "reference model" not in no_kl.hardware.memory_breakdown_gb


def test_a_broken_reward_stops_rloo_before_any_spend(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def reward(completions, **kw):\n    return [1.0]  # one score for many completions\n")
    with pytest.raises(RewardError, match="bad.py:reward' must return a list of"):
        plan_run(parse_spec(_spec(rewards=[f"{bad}:reward"])), tmp_path)
    assert not list(tmp_path.glob("*/train.py"))


def test_rloo_trains_through_the_lifecycle(trains, prefect_server, tmp_path):
    spec = parse_spec(_spec(name="rloo-test", outputs={"hub_repo": str(tmp_path / "published"), "gguf": []}))
    summary = rloo(spec=spec)
    assert summary.error is None, summary.stages
    assert summary.job.last_metrics.get("train/reward") is not None
    assert summary.evaluation is not None and summary.evaluation.primary == "sum of greedy rewards"
    assert "'trainer': 'RLOOTrainer'" in Path(summary.plan.script.path).read_text()
