"""The ORPO lifecycle on the embedded default: the same pipeline and the same held-out measure
as DPO (the chosen answer's log-probability margin over the rejected one), with no reference
model in the plan."""

from __future__ import annotations

from pathlib import Path

from flows.orpo import orpo
from tasks.core.spec import load_spec
from tests.helpers import EXAMPLES


def test_orpo_raises_the_preference_margin_without_a_reference_model(trains, prefect_server, tmp_path):
    overrides = {"name": "orpo-test", "outputs": {"hub_repo": str(tmp_path / "published"), "gguf": ["q8_0"]}}
    summary = orpo(spec=load_spec(EXAMPLES / "orpo-tiny.yaml", overrides))
    assert summary.error is None, summary.stages
    assert all(s.status == "passed" for s in summary.stages), summary.stages
    assert "reference model" not in summary.plan.hardware.memory_breakdown_gb
    assert summary.evaluation.verdict == "improved" and summary.evaluation.primary.startswith("chosen-over-rejected")
    first, last = summary.job.first_metrics, summary.job.last_metrics
    assert last["train/rewards/margins"] > first["train/rewards/margins"]
    script = Path(summary.plan.script.path).read_text()
    assert "'trainer': 'ORPOTrainer'" in script and "'trainer_module': 'trl.experimental.orpo'" in script
    assert "rewards/margins:" in Path(summary.run_dir, "report.md").read_text()
