"""The KTO lifecycle on the embedded default: single answers labelled desirable or not; the
held-out desirable answers become likelier and the undesirable ones less likely."""

from __future__ import annotations

from pathlib import Path

from flows.kto import kto
from tasks.core.spec import load_spec
from tests.helpers import EXAMPLES


def test_kto_raises_desirable_answers_and_lowers_undesirable_ones(trains, prefect_server, tmp_path):
    overrides = {"name": "kto-test", "outputs": {"hub_repo": str(tmp_path / "published"), "gguf": []}}
    summary = kto(spec=load_spec(EXAMPLES / "kto-tiny.yaml", overrides))
    assert summary.error is None, summary.stages
    assert all(s.status in ("passed", "skipped") for s in summary.stages), summary.stages
    assert summary.plan.hardware.micro_batch >= 2  # KTO's KL term needs the other rows of a micro-batch
    assert "reference model" not in summary.plan.hardware.memory_breakdown_gb  # LoRA: the base, adapter off
    evaluation = summary.evaluation
    assert evaluation.verdict == "improved" and evaluation.primary.startswith("label-signed")
    desirable, undesirable = evaluation.metrics
    assert desirable.trained > desirable.base and undesirable.trained < undesirable.base
    assert summary.job.last_metrics["train/rewards/margins"] > summary.job.first_metrics["train/rewards/margins"]
    script = Path(summary.plan.script.path).read_text()
    assert "'trainer': 'KTOTrainer'" in script and "'measure': 'label_likelihood'" in script
