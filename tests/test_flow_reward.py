"""A reward model from preference pairs on the embedded default: a sequence classifier that
learns to score the chosen answer above the rejected one; it is not a chat model, so no GGUF
files are made, and asking for them is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.planning import plan_run
from flows.reward import reward
from tasks.core.spec import SpecError, load_spec
from tests.helpers import EXAMPLES


def test_asking_a_reward_model_for_gguf_files_is_refused_with_the_reason(tmp_path):
    spec = load_spec(EXAMPLES / "reward-tiny.yaml", {"outputs": {"gguf": ["q8_0"]}})
    with pytest.raises(SpecError, match="outputs.gguf: reward makes no GGUF files: a reward model is a sequence"):
        plan_run(spec, tmp_path)
    plan = plan_run(load_spec(EXAMPLES / "reward-tiny.yaml"), tmp_path)  # the default GGUF types are dropped
    assert any("no GGUF files" in note for note in plan.notes)
    assert plan.hardware.memory_breakdown_gb.get("logits", 0) < 0.0001  # one score a sequence, not a vocabulary


def test_a_reward_model_learns_to_rank_the_held_out_pairs(trains, prefect_server, tmp_path):
    published = tmp_path / "published"
    summary = reward(
        spec=load_spec(EXAMPLES / "reward-tiny.yaml", {"name": "reward-test", "outputs": {"hub_repo": str(published)}})
    )
    assert summary.error is None, summary.stages
    stages = {s.stage: s for s in summary.stages}
    assert stages["convert_gguf"].status == "skipped" and "sequence classifier" in stages["convert_gguf"].detail
    evaluation = summary.evaluation
    assert evaluation.primary.startswith("held-out pair accuracy") and evaluation.trained_score >= 0.9
    assert evaluation.verdict == "improved"
    config = json.loads((Path(summary.result.model_dir) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and len(config["id2label"]) == 1
    card = (published / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    assert not list(published.glob("*.gguf"))
