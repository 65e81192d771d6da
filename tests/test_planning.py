"""Hardware, cost, approval and script: the plan that decides what gets spent."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from flows.pipeline import plan_run
from tasks.approval import ApprovalInput, BudgetExceeded, NotApproved, auto_decision, decision_from_input
from tasks.cost import estimate_cost, training_tokens
from tasks.hardware import HardwareError, count_parameters, select_hardware
from tasks.methods import SFT, training_arguments
from tasks.model_source import load_config
from tasks.models import CostEstimate
from tasks.spec import Budget, SpecError, parse_spec
from tests.conftest import EXAMPLES

CHAT = str(EXAMPLES / "data" / "sft_chat.jsonl")


def _spec(**kw):
    return parse_spec({"dataset": CHAT, "training": {"max_length": 128}, **kw})


def _args(**over):
    return training_arguments(SFT, {"max_length": 128, **over}, on_gpu=False, bf16=False)


def test_parameter_count_is_exact_and_lora_count_matches_peft(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    counts = count_parameters(load_config(tiny_model_path), 16, "all-linear")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert counts.total == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert counts.lora_trainable == trainable


def test_auto_trains_the_tiny_model_fully_on_this_machine(tiny_model_path):
    plan = select_hardware(_spec(), load_config(tiny_model_path), _args())
    assert plan.backend == "local" and plan.flavor in ("local-cpu", "local-cuda")
    assert plan.use_lora is False and plan.lora_reason.startswith("auto: full fine-tuning fits")
    assert plan.trainable_parameters == plan.parameters
    assert plan.estimated_peak_memory_gb == pytest.approx(sum(plan.memory_breakdown_gb.values()), rel=1e-3)


def test_lora_true_trains_only_the_adapter_and_needs_less_optimizer_memory(tiny_model_path):
    config = load_config(tiny_model_path)
    full = select_hardware(_spec(), config, _args())
    lora = select_hardware(_spec(lora=True), config, _args())
    assert lora.use_lora and lora.trainable_parameters < full.trainable_parameters / 4
    assert lora.memory_breakdown_gb["optimizer"] < full.memory_breakdown_gb["optimizer"]


def test_activation_memory_grows_with_sequence_and_batch(tiny_model_path):
    config = load_config(tiny_model_path)
    small = select_hardware(_spec(), config, _args(per_device_train_batch_size=1))
    big = select_hardware(_spec(), config, _args(per_device_train_batch_size=8))
    ratio = big.memory_breakdown_gb["activations"] / small.memory_breakdown_gb["activations"]
    assert ratio == pytest.approx(8, rel=0.01)


def test_a_run_that_cannot_fit_says_what_would(tiny_model_path):
    with pytest.raises(HardwareError, match="smaller max_length .* lora: true"):
        select_hardware(
            _spec(), load_config(tiny_model_path), _args(per_device_train_batch_size=4096, max_length=65536)
        )


def test_cloud_backends_and_flavors_are_refused_clearly_for_now(tiny_model_path):
    config = load_config(tiny_model_path)
    with pytest.raises(HardwareError, match="backend 'hf-jobs' is not available yet"):
        select_hardware(_spec(backend="hf-jobs"), config, _args())
    with pytest.raises(HardwareError, match="set hardware: auto"):
        select_hardware(_spec(hardware="a100-large"), config, _args())


def test_training_tokens_follow_epochs_or_max_steps(tiny_model_path, tiny_tokenizer, tmp_path):
    from tasks.validate import validate_dataset

    report = validate_dataset(CHAT, SFT, tiny_tokenizer, 128, tmp_path)
    two_epochs = training_tokens(report, _args(num_train_epochs=2))
    assert two_epochs == pytest.approx(2 * report.train_rows * report.tokens.mean, rel=0.01)
    capped = training_tokens(report, _args(max_steps=10, per_device_train_batch_size=4))
    assert capped == int(40 * report.tokens.mean)
    plan = select_hardware(_spec(), load_config(tiny_model_path), _args())
    cost = estimate_cost(report, plan, _args())
    assert cost.usd == 0 and cost.hours_low < cost.hours < cost.hours_high
    assert cost.estimated_flops == 6 * plan.parameters * cost.tokens


def _cost(usd: float) -> CostEstimate:
    return CostEstimate(
        flavor="x",
        price_per_hour_usd=1,
        tokens=1,
        estimated_flops=1,
        hours=usd,
        hours_low=usd / 2,
        hours_high=usd * 2,
        usd=usd,
        usd_low=usd / 2,
        usd_high=usd * 2,
        basis="test",
    )


def test_approval_is_automatic_only_when_the_high_estimate_is_under_the_threshold():
    budget = Budget(max_usd=20, auto_approve_usd=2)
    approved = auto_decision(_cost(0.9), budget)
    assert approved is not None and approved.by == "auto" and "within auto_approve_usd" in approved.reason
    assert auto_decision(_cost(1.5), budget) is None  # high end $3 > $2: a person decides
    with pytest.raises(BudgetExceeded, match=r"above budget.max_usd \$20.00"):
        auto_decision(_cost(25), budget)


def test_a_persons_answer_decides():
    budget = Budget(max_usd=20, auto_approve_usd=2)
    ok = decision_from_input(ApprovalInput(approve=True, reason="fine", max_usd=10), _cost(5), budget)
    assert ok.by == "user" and ok.max_usd == 10
    with pytest.raises(NotApproved, match="declined: too dear"):
        decision_from_input(ApprovalInput(approve=False, reason="too dear"), _cost(5), budget)
    with pytest.raises(NotApproved, match="below the estimate"):
        decision_from_input(ApprovalInput(approve=True, max_usd=3), _cost(5), budget)


def test_dry_run_plan_writes_a_self_contained_script(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    plan = plan_run(_spec(name="plan-test", lora=True))
    run_dir = Path(plan.run_dir)
    assert {p.name for p in run_dir.iterdir()} >= {"spec.yaml", "plan.json", "train.py", "data"}
    source = Path(plan.script.path).read_text()
    ast.parse(source)
    assert re.search(r"# /// script\n# requires-python.*\n# dependencies = \[\n#   \"torch==", source)
    assert '"trl==1.16.0"' in source and "SFTTrainer" in source
    imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import | ast.ImportFrom)]
    modules = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0] for n in imports}
    assert not modules & {"tasks", "flows", "training", "deployments"}
    assert "'lora_alpha': 32" in source and "'report_to'" not in source  # report_to is fixed in the template
    assert "hf_xxxx" not in source and "hf_xxxx" not in (run_dir / "plan.json").read_text()
    assert plan.hardware.use_lora and plan.cost.usd == 0


def test_training_options_are_checked_against_the_trl_config():
    with pytest.raises(SpecError, match=r"'lerning_rate' \(did you mean 'learning_rate'"):
        plan_run(_spec(training={"lerning_rate": 1e-3}))
    with pytest.raises(SpecError, match="looks like a secret"):
        plan_run(_spec(training={"hub_token": "abc"}))


def test_reusing_a_run_name_with_another_spec_is_refused():
    from tasks.rundir import RunFolderConflict

    plan_run(_spec(name="same"))
    plan_run(_spec(name="same"))  # identical spec: allowed (it resumes)
    with pytest.raises(RunFolderConflict, match="different spec"):
        plan_run(_spec(name="same", seed=7))
