"""Estimates that learn: measured runs become per-(flavor, family, mode) corrections that the
planner applies, without compounding, and a bad table never breaks planning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.calibrate import main as calibrate_main
from flows.planning import plan_run
from tasks.core.spec import load_spec
from tasks.plan.calibration import load_table, observation, refresh, table_path
from tests.helpers import EXAMPLES


def _plan(tmp_path: Path, name: str):
    return plan_run(load_spec(EXAMPLES / "sft-tiny.yaml", {"name": name, "outputs": {"hub_repo": None}}), tmp_path)


def _finished(runs: Path, plan, train_s: float, peak_gb: float) -> None:
    """A report.json as a finished run leaves it: the plan and what the script measured."""
    report = {
        "plan": json.loads(plan.model_dump_json()),
        "result": {
            "measured": {
                "train_s": train_s,
                "optimizer_steps": plan.cost.optimizer_steps,
                "tokens": plan.cost.tokens,
                "peak_memory_gb": peak_gb,
                "device": "cpu",
            }
        },
    }
    (runs / plan.run_name).mkdir(parents=True, exist_ok=True)
    (runs / plan.run_name / "report.json").write_text(json.dumps(report))


def test_measured_runs_correct_the_next_plan_of_the_same_kind(tmp_path, capsys):
    runs = tmp_path / "runs"
    first = _plan(runs, "first")
    assert first.cost.time_factor == 1.0 and first.cost.calibration == ""
    assert first.cost.optimizer_steps == 48  # 380 rows (20 held out) / 8 per step, the last one short
    est_s, est_gb = first.cost.compute_s, first.hardware.estimated_peak_memory_gb
    # three runs measured 2x, 3x and 10x slower than planned, memory 1.5x: the median is taken
    for i, slower in enumerate((2.0, 3.0, 10.0)):
        _finished(runs, first.model_copy(update={"run_name": f"run{i}"}), est_s * slower, est_gb * 1.5)
    (runs / "unfinished").mkdir()  # a run without a report is skipped
    assert calibrate_main(["--runs", str(runs)]) == 0
    assert "local-cpu        qwen2        full      3    3.000     1.500" in capsys.readouterr().out
    assert table_path() == tmp_path / "calibration.json" and load_table().corrections[0].runs == 3

    second = _plan(runs, "second")
    assert second.cost.time_factor == pytest.approx(3.0)
    # the measured peak CPU FLOP/s moves between plans, so the raw estimate is compared through the factor
    assert second.cost.compute_s / second.cost.time_factor == pytest.approx(est_s, rel=0.5)
    assert "x3.00 as measured on 3 earlier run(s)" in second.cost.basis
    assert second.hardware.memory_factor == 1.5
    assert second.hardware.estimated_peak_memory_gb == pytest.approx(est_gb * 1.5, rel=0.01)
    assert second.hardware.memory_breakdown_gb["calibration"] == pytest.approx(est_gb * 0.5, rel=0.01)

    # a run planned with the correction that then took what the corrected plan said: the raw
    # ratio is 3x again, not 1x (factors are divided out, so they do not compound)
    key, time_ratio, memory_ratio = observation(
        {
            "plan": json.loads(second.model_dump_json()),
            "result": {
                "measured": {
                    "train_s": second.cost.compute_s,
                    "optimizer_steps": second.cost.optimizer_steps,
                    "tokens": 1,
                    "peak_memory_gb": second.hardware.estimated_peak_memory_gb,
                    "device": "cpu",
                }
            },
        }
    )
    assert key == ("local-cpu", "qwen2", "full")
    assert (time_ratio, memory_ratio) == (pytest.approx(3.0), pytest.approx(1.5))


def test_a_resumed_job_is_compared_with_its_share_of_the_plan(tmp_path):
    plan = _plan(tmp_path / "runs", "resumed")
    report = {
        "plan": json.loads(plan.model_dump_json()),
        "result": {
            "measured": {
                "train_s": plan.cost.compute_s / 4,
                "optimizer_steps": plan.cost.optimizer_steps // 4,  # it resumed three quarters in
                "tokens": 1,
                "peak_memory_gb": 1.0,
                "device": "cpu",
            }
        },
    }
    assert observation(report)[1] == pytest.approx(1.0, rel=0.01)


def test_a_broken_or_missing_table_leaves_plans_uncorrected(tmp_path):
    table_path().write_text("{not json")
    assert load_table().corrections == []
    assert _plan(tmp_path / "runs", "after-garbage").cost.time_factor == 1.0
    assert refresh(tmp_path / "nothing-here").corrections == []
