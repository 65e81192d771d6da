"""The batch split timed on this machine: where planning probes it, what it times, how the
choice and the estimate follow the measured rates, and that a failed probe changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.planning import plan_run
from tasks.core.models import SplitProbe, SplitRate
from tasks.core.spec import load_spec
from tasks.plan import probe
from tasks.plan.probe import affordable, candidates, why_not
from tests.helpers import EXAMPLES


def _spec(tmp_path: Path, name: str, rows: int = 48, **training):
    """The demo's spec on chat rows of mixed length written for this test (a probe of these rows
    is not in the session's cache yet), none over max_length."""
    from training.example_data import chat_rows_at_scale, write_jsonl_stream

    data = tmp_path / "chat.jsonl"
    if not data.exists():
        mixed = (r for r in chat_rows_at_scale(4 * rows, seed=11, spread="realistic") if len(json.dumps(r)) < 2500)
        write_jsonl_stream(list(mixed)[:rows], data)
    return load_spec(
        EXAMPLES / "sft-tiny.yaml",
        {"name": name, "dataset": str(data), "training": {"max_length": 2048, **training}},
    )


def test_planning_times_the_candidate_splits_here_and_prices_the_run_at_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv(probe.PROBE_ENV, "1")
    plan = plan_run(_spec(tmp_path, "probed"), runs_root=tmp_path)
    hardware, cost = plan.hardware, plan.cost
    timed = hardware.split_probe
    assert timed is not None and not timed.cached and not timed.note
    # micro-batch 1, the time model's split, padding-free batches of 8 and of 4, in that order
    assert [(r.micro_batch, r.padding_free) for r in timed.rates][:1] == [(1, False)]
    assert {(8, True), (4, True)} <= {(r.micro_batch, r.padding_free) for r in timed.rates}
    assert all(r.steps >= 2 and r.seconds > 0 and r.computed_tokens >= r.real_tokens > 0 for r in timed.rates)
    assert all(r.computed_tokens == r.real_tokens for r in timed.rates if r.padding_free or r.micro_batch == 1)

    # the chosen split is the one whose measured rate gives the shortest run, and the estimate is that rate
    chosen = hardware.measured_split
    assert chosen is not None and "the fastest split timed on this machine" in hardware.batch_reason
    expected = chosen.seconds_per_computed_token * cost.tokens * hardware.padding_overhead + chosen.first_step_extra_s
    assert cost.compute_s == pytest.approx(expected, rel=1e-6) and chosen.warmup_s > 0
    assert "measured on this machine" in cost.basis and cost.modelled_compute_s > 0
    for rate in timed.rates:  # every other split's run, at its own rate, would take longer
        assert f"{rate.label}: {rate.real_tokens_per_s:,.0f} real tokens/s" in hardware.batch_reason

    # the script trains with that split; the probe left nothing in the run folder but its own file
    config = plan.script.config
    assert config["training"]["per_device_train_batch_size"] == chosen.micro_batch
    assert config["padding_free_batches"] is chosen.padding_free and "padding_free" not in config["training"]
    assert config["training"]["max_length"] == 2048  # padding-free or not, rows are cut where the spec says
    run_dir = Path(plan.run_dir)
    assert (run_dir / "finetune_probe.py").exists() and not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / "plan.json").read_text())["hardware"]["split_probe"]["rates"]

    # the same script, data and machine again: read from the cache, not timed again
    again = plan_run(_spec(tmp_path, "probed-again"), runs_root=tmp_path)
    assert again.hardware.split_probe.cached and again.hardware.split_probe.rates == timed.rates


def test_padding_free_batches_are_timed_for_text_models_only(tmp_path):
    plan = plan_run(_spec(tmp_path, "open"), runs_root=tmp_path)  # the suite's default: not probed
    assert plan.hardware.split_probe is None and "by the time model" in plan.hardware.batch_reason
    found = candidates(plan.hardware, vision=False)
    # padding-free candidates attend row by row, as the script would train them here
    assert {"micro_batch": 8, "padding_free": True, "attention": "sdpa_rows"} in found
    assert found[0] == {"micro_batch": 1} and len(found) <= probe.MAX_CANDIDATES
    assert not any(c.get("padding_free") for c in candidates(plan.hardware, vision=True))


def test_the_split_is_probed_only_where_it_is_open_and_the_run_trains_here(tmp_path, monkeypatch):
    plan = plan_run(_spec(tmp_path, "open"), runs_root=tmp_path)
    hardware, report = plan.hardware, plan.dataset
    assert why_not(_spec(tmp_path, "x"), hardware, report) == "FINETUNE_SPLIT_PROBE=0"
    monkeypatch.setenv(probe.PROBE_ENV, "1")
    assert why_not(_spec(tmp_path, "x"), hardware, report) == ""
    assert "gradient_accumulation_steps" in why_not(
        _spec(tmp_path, "x", gradient_accumulation_steps=2), hardware, report
    )
    assert "padding_free" in why_not(_spec(tmp_path, "x", padding_free=True), hardware, report)
    dpo = load_spec(EXAMPLES / "dpo-tiny.yaml", {"name": "x"})
    assert "DPOTrainer batches its own way" in why_not(dpo, hardware, report)
    job = _spec(tmp_path, "x").model_copy(update={"backend": "hf-jobs"})
    assert "this machine's CPU" in why_not(job, hardware, report)


def test_a_probe_that_would_take_minutes_times_fewer_splits_or_none(tmp_path):
    plan = plan_run(_spec(tmp_path, "open"), runs_root=tmp_path)
    found = candidates(plan.hardware, vision=False)
    quick = plan.cost.model_copy(update={"compute_s": 10.0, "optimizer_steps": 100})
    assert affordable(found, quick) == (found, "")
    slow = plan.cost.model_copy(update={"compute_s": 100 * 15.0, "optimizer_steps": 100})
    assert affordable(found, slow)[0] == found[:2]
    hopeless = plan.cost.model_copy(update={"compute_s": 100 * 60.0, "optimizer_steps": 100})
    kept, why = affordable(found, hopeless)
    assert kept == [] and "one optimizer step takes ~60 s" in why


def test_a_failed_probe_leaves_the_split_to_the_time_model_and_caches_nothing(tmp_path, monkeypatch):
    from tasks.core.model_source import load_config
    from tasks.plan.hardware import select_hardware

    plan = plan_run(_spec(tmp_path, "open"), runs_root=tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()  # no finetune_probe.py: the process exits with an error
    with monkeypatch.context() as mp:
        mp.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))  # a cache no other test writes to
        failed = probe.probe_splits(broken, {**plan.script.config, "data": "none.jsonl"}, [{"micro_batch": 1}])
    assert not failed.rates and "the probe failed, so the time model chose the split" in failed.note
    assert "finetune_probe.py exited 2" in failed.note
    assert not list((tmp_path / "cache").rglob("*.json"))
    spec = _spec(tmp_path, "open")
    again, _ = select_hardware(
        spec, load_config(plan.model_path), {"per_device_train_batch_size": 8}, plan.dataset, probe=failed
    )
    assert "by the time model" in again.batch_reason and again.measured_split is None


def test_a_measured_rate_replaces_the_time_model_and_not_the_calibration_it_learns_from():
    from tasks.plan.calibration import observation

    rate = SplitRate(micro_batch=1, accumulation=8, steps=4, seconds=2.0, real_tokens=8000, computed_tokens=8000)
    assert rate.seconds_per_computed_token == 0.00025 and rate.real_tokens_per_s == 4000
    assert SplitProbe(rates=[rate]).rate(1, False) == rate and SplitProbe(rates=[rate]).rate(1, True) is None
    report = {
        "result": {"measured": {"train_s": 30.0, "optimizer_steps": 10, "peak_memory_gb": 1.0}},
        "plan": {
            "cost": {"compute_s": 20.0, "modelled_compute_s": 60.0, "optimizer_steps": 10},
            "hardware": {"estimated_peak_memory_gb": 1.0, "flavor": "local-cpu", "model_type": "qwen2", "mode": "full"},
        },
    }
    _, time_ratio, _ = observation(report)
    assert time_ratio == 0.5  # measured against the time model's 60 s, not the probe's 20 s


def test_two_plans_on_one_machine_time_their_splits_one_after_the_other(tmp_path, monkeypatch):
    """Two probes at once would share the cores and both cache wrong rates: the second waits, then
    reads what the first measured for the same script and data; past the wait it gives up."""
    import threading
    import time

    from tasks.core.derived_cache import derived

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    timings, running = [], threading.Event()

    def slow_probe() -> dict:
        running.set()
        time.sleep(1.0)
        timings.append("timed")
        return {"rate": 1.0}

    first = threading.Thread(target=lambda: derived("probe-test", {"k": 1}, slow_probe, alone_within_s=30))
    first.start()
    running.wait(5)
    with pytest.raises(TimeoutError, match="another process held it"):
        derived("probe-test", {"k": 2}, slow_probe, alone_within_s=0.2)
    assert derived("probe-test", {"k": 1}, slow_probe, alone_within_s=30) == {"rate": 1.0}
    first.join()
    assert timings == ["timed"]  # the second plan read the first's rates instead of timing again
