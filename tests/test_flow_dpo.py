"""The DPO lifecycle on the embedded default: the same pipeline as SFT, and the method's own
signal (reward margin and preference accuracy) must move the right way."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.dpo import dpo
from tasks.core.spec import load_spec
from tests.helpers import EXAMPLES


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_dpo_raises_the_preference_margin_and_accuracy(trains, prefect_server, tmp_path):
    start = time.monotonic()
    spec = load_spec(
        EXAMPLES / "dpo-tiny.yaml", {"name": "dpo-test", "outputs": {"hub_repo": str(tmp_path / "published")}}
    )
    summary = dpo(spec=spec)
    assert time.monotonic() - start < 600  # a hang guard; about a minute on an idle 2-core machine
    assert summary.error is None, summary.stages
    assert all(s.status == "passed" for s in summary.stages), summary.stages
    first, last = summary.job.first_metrics, summary.job.last_metrics
    assert last["train/rewards/margins"] > first["train/rewards/margins"] + 1.0
    assert last["train/rewards/accuracies"] >= max(first["train/rewards/accuracies"], 0.95)
    assert summary.plan.hardware.use_lora and summary.result.adapter_dir  # no reference copy: an adapter
    script = Path(summary.plan.script.path).read_text()
    assert "'trainer': 'DPOTrainer'" in script and "'beta': 0.1" in script
    report = Path(summary.run_dir, "report.md").read_text()
    assert "rewards/margins:" in report and "rewards/accuracies:" in report
    assert (tmp_path / "published" / "adapter" / "adapter_config.json").exists()
