"""Planning: memory and time models on real architectures, the selection rule, the approval
decision and the generated script. Expected values are computed by hand in the tests."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from flows.planning import plan_run
from tasks.core.methods import DPO, GRPO, ORPO, SFT, check_training_keys
from tasks.core.spec import Budget, SpecError
from tasks.plan.cost import RANGE_HIGH, RANGE_LOW, training_tokens
from tasks.plan.flavors import CatalogueError, load_catalogue
from tasks.plan.hardware import LORA_AUTO_THRESHOLD, HardwareError, select_hardware
from tasks.plan.memory import (
    GB,
    LOGIT_BYTES_PER_ENTRY,
    RUNTIME_GB,
    Architecture,
    Workload,
    flops_per_token,
    memory_breakdown_gb,
)
from tasks.stages.approval import ApprovalInput, BudgetExceeded, NotApproved, auto_decision, decision_from_input
from tests.helpers import CONFIGS, chat_spec, cost_estimate, dataset_report, hf_config, sft_args

# --- the architecture, from config.json --------------------------------------------------


def test_gradient_checkpointing_is_chosen_only_when_the_memory_model_needs_it():
    qwen = hf_config("qwen2.5-0.5b")
    roomy, _ = select_hardware(chat_spec(backend="hf-jobs", hardware="a100-large"), qwen, sft_args(), dataset_report())
    assert not roomy.gradient_checkpointing and roomy.checkpointing_reason.startswith("off: the run fits without it")
    assert (roomy.micro_batch, roomy.accumulation) == (4, 1)
    # full fine-tuning, 8 rows of 4096 tokens a step on one 80 GB GPU: a smaller micro-batch with
    # accumulation keeps the global batch and fits without recomputing
    long_rows = sft_args(max_length=4096, per_device_train_batch_size=8)
    split, _ = select_hardware(
        chat_spec(backend="hf-jobs", hardware="a100-large", lora={"enabled": False}),
        qwen,
        long_rows,
        dataset_report(mean=3000, longest=4096),
    )
    assert not split.gradient_checkpointing
    assert split.micro_batch < 8 and split.micro_batch * split.accumulation == 8
    assert "the largest micro-batch that fits" in split.batch_reason
    assert split.estimated_peak_memory_gb <= split.available_memory_gb
    # the spec fixes the split (it sets gradient_accumulation_steps): only recomputing makes it fit
    tight, _ = select_hardware(
        chat_spec(
            backend="hf-jobs",
            hardware="a100-large",
            lora={"enabled": False},
            training={"gradient_accumulation_steps": 1},
        ),
        qwen,
        {**long_rows, "gradient_accumulation_steps": 1},
        dataset_report(mean=3000, longest=4096),
    )
    assert (tight.micro_batch, tight.accumulation) == (8, 1) and tight.batch_reason.startswith("set in the spec")
    assert tight.gradient_checkpointing and tight.checkpointing_reason.startswith("on: without it even micro-batch 8")
    assert tight.estimated_peak_memory_gb <= tight.available_memory_gb
    forced, forced_cost = select_hardware(
        chat_spec(backend="hf-jobs", hardware="a100-large", training={"gradient_checkpointing": True}),
        qwen,
        sft_args(gradient_checkpointing=True),
        dataset_report(),
    )
    assert forced.gradient_checkpointing and forced.checkpointing_reason == "on: set in the spec"
    unforced, unforced_cost = select_hardware(
        chat_spec(backend="hf-jobs", hardware="a100-large"), qwen, sft_args(), dataset_report()
    )
    assert forced_cost.hours > unforced_cost.hours  # the estimate pays for the recomputed forward
    local, _ = select_hardware(
        chat_spec(), hf_config("smollm2-135m"), sft_args(), dataset_report(rows=50, mean=64, longest=128)
    )
    assert not local.gradient_checkpointing and "CPU" in local.checkpointing_reason


def test_parameter_counts_match_the_published_sizes():
    # hand-computed: embeddings + layers x (q, k, v, o with Qwen's q/k/v biases, gated MLP, 2 norms) + final norm
    qwen = 151936 * 896 + 24 * (896 * 896 + 896 + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896) + 896
    llama8 = 2 * 128256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    llama70 = 2 * 128256 * 8192 + 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192
    assert (qwen, llama8, llama70) == (494_032_768, 8_030_261_248, 70_553_706_496)
    assert Architecture.from_config(hf_config("qwen2.5-0.5b")).params == qwen
    assert Architecture.from_config(hf_config("llama-3.1-8b")).params == llama8
    assert Architecture.from_config(hf_config("llama-3.1-70b")).params == llama70


def test_lora_parameters_match_peft(tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.core.model_source import load_config

    arch = Architecture.from_config(load_config(tiny_model_path), 16, "all-linear")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert arch.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Qwen2.5-0.5B, r=16 on every decoder linear: 24 x 16 x (q, k, v, o, gate, up, down in+out)
    qwen = Architecture.from_config(hf_config("qwen2.5-0.5b"), 16, "all-linear")
    assert qwen.lora_params == 24 * 16 * ((896 + 896) * 2 + (896 + 128) * 2 + (896 + 4864) * 3)


def test_memory_of_a_full_bf16_run_is_the_sum_of_its_parts():
    arch = Architecture.from_config(hf_config("qwen2.5-0.5b"))
    w = Workload(mode="full", dtype_bytes=2, micro_batch=4, seq_len=1024, checkpointing=True)
    m = memory_breakdown_gb(arch, w, "gpu", 80)
    p, tokens = 494_032_768, 4 * 1024
    assert m["weights"] == pytest.approx(p * 2 / GB, abs=1e-4)
    assert m["gradients"] == pytest.approx(p * 2 / GB, abs=1e-4)
    assert m["optimizer"] == pytest.approx(p * 8 / GB, abs=1e-4)
    # checkpointed: each layer's input, plus one layer's activations (5h + 2kv + 4i values per token)
    act = tokens * 896 * 2 * 24 + tokens * (5 * 896 + 2 * 128 + 4 * 4864) * 2
    assert m["activations"] == pytest.approx(act / GB, abs=1e-4)
    assert m["logits"] == pytest.approx(tokens * 151936 * LOGIT_BYTES_PER_ENTRY / GB, abs=1e-4)
    assert m["runtime"] == RUNTIME_GB["gpu"]
    assert "adapter" not in m and "reference model" not in m


def test_a_padding_free_micro_batch_is_sized_at_the_largest_its_rows_make_in_an_epoch():
    """Its peak comes with its longest sequence: the largest sum of its rows over the epoch's
    draws (log-uniform lengths here), not one longest row and the rest average."""
    import random

    from tasks.plan.memory import largest_padding_free_batch

    rng = random.Random(0)
    lengths = sorted(int(2 ** rng.uniform(5, 12)) for _ in range(400))
    report = dataset_report(rows=400).model_copy(
        update={"length_percentiles": [lengths[min(399, 4 * i)] for i in range(101)]}
    )
    for micro, cut in ((4, 1024), (8, 512), (8, 128)):
        cut_rows = [min(x, cut) for x in lengths]
        epochs = []
        for _ in range(50):
            rng.shuffle(cut_rows)
            epochs.append(max(sum(cut_rows[i : i + micro]) for i in range(0, 400, micro)))
        simulated = sorted(epochs)[25]
        assert simulated <= largest_padding_free_batch(report, micro, cut) <= 1.15 * simulated
        assert largest_padding_free_batch(report, micro, cut) <= micro * cut


def test_qlora_weights_are_four_bit_and_dpo_adds_a_reference_only_without_lora():
    arch = Architecture.from_config(hf_config("llama-3.1-8b"))
    q = memory_breakdown_gb(arch, Workload(mode="qlora"), "gpu", 24)
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert q["weights"] == pytest.approx((linear * 0.516 + (8_030_261_248 - linear) * 2) / GB, abs=1e-3)
    full_dpo = memory_breakdown_gb(arch, Workload.of(DPO, mode="full"), "gpu", 141)
    lora_dpo = memory_breakdown_gb(arch, Workload.of(DPO, mode="lora"), "gpu", 141)
    assert full_dpo["reference model"] == pytest.approx(8_030_261_248 * 2 / GB, abs=1e-3)
    assert "reference model" not in lora_dpo
    sft = memory_breakdown_gb(arch, Workload.of(SFT, mode="lora"), "gpu", 141)
    assert lora_dpo["activations"] == pytest.approx(
        2 * sft["activations"], abs=2e-4
    )  # chosen + rejected (values rounded to 1e-4 GB)


def test_orpo_plans_its_pairs_without_a_reference_model_and_so_below_dpo():
    """ORPO's odds ratio needs no reference model: full fine-tuning holds one model, where DPO
    holds two, and each step computes no reference forward; both put chosen and rejected through."""
    arch = Architecture.from_config(hf_config("llama-3.1-8b"))
    dpo, orpo = (memory_breakdown_gb(arch, Workload.of(m, mode="full"), "gpu", 141) for m in (DPO, ORPO))
    assert "reference model" in dpo and "reference model" not in orpo
    assert orpo["activations"] == dpo["activations"]  # the same pairs
    assert sum(orpo.values()) < sum(dpo.values())
    assert flops_per_token(arch, Workload.of(ORPO)) < flops_per_token(arch, Workload.of(DPO))
    grpo_off, grpo_on = (Workload.of(GRPO, {"beta": beta}) for beta in (0.0, 0.04))
    assert not grpo_off.reference_model and grpo_on.reference_model  # GRPO's reference hangs on beta


# --- the selection rule -----------------------------------------------------------------


def test_a_small_model_trains_fully_on_the_cheapest_flavor_that_fits():
    plan, cost = select_hardware(chat_spec(backend="hf-jobs"), hf_config("qwen2.5-0.5b"), sft_args(), dataset_report())
    assert plan.mode == "full" and plan.lora_reason == "auto: full fine-tuning fits"
    assert plan.estimated_peak_memory_gb <= plan.available_memory_gb
    cheaper_fitting = [o for o in plan.alternatives if o.usd < cost.usd]
    assert cheaper_fitting == []  # nothing that fits is cheaper
    assert cost.usd == pytest.approx(cost.hours * cost.price_per_hour_usd)
    assert cost.usd_low == pytest.approx(cost.usd * RANGE_LOW) and cost.usd_high == pytest.approx(cost.usd * RANGE_HIGH)


def test_above_the_size_threshold_auto_switches_to_lora_and_to_qlora_when_needed():
    assert 8_030_261_248 > LORA_AUTO_THRESHOLD
    plan8, _ = select_hardware(
        chat_spec(backend="hf-jobs"),
        hf_config("llama-3.1-8b"),
        sft_args(per_device_train_batch_size=1),
        dataset_report(),
    )
    assert plan8.mode == "lora" and "threshold" in plan8.lora_reason
    plan70, _ = select_hardware(
        chat_spec(backend="hf-jobs", hardware="h200"),
        hf_config("llama-3.1-70b"),
        sft_args(per_device_train_batch_size=1),
        dataset_report(),
    )
    assert plan70.mode == "qlora" and "fits nowhere" in plan70.lora_reason
    assert plan70.accelerator is not None


def test_a_named_flavor_that_is_too_small_says_what_would_fit():
    with pytest.raises(HardwareError) as e:
        select_hardware(
            chat_spec(backend="hf-jobs", hardware="t4-small", lora=False),
            hf_config("llama-3.1-8b"),
            sft_args(per_device_train_batch_size=1),
            dataset_report(),
        )
    msg = str(e.value)
    assert msg.startswith("the run fits on nothing: not on the chosen flavor 't4-small'")
    assert "lora: auto" in msg and "- hardware: " in msg


def test_max_hours_excludes_slow_placements():
    spec = chat_spec(backend="hf-jobs", budget={"max_usd": 1000, "auto_approve_usd": 1, "max_hours": 0.05})
    with pytest.raises(HardwareError, match="max_hours"):
        select_hardware(spec, hf_config("llama-3.1-8b"), sft_args(), dataset_report(rows=200_000))


def test_prices_can_be_overridden_and_flavors_added_in_the_spec():
    base, cost = select_hardware(chat_spec(backend="hf-jobs"), hf_config("qwen2.5-0.5b"), sft_args(), dataset_report())
    cheap = {
        "mygpu": {
            "accelerator": "A100",
            "count": 1,
            "memory_gb": 80,
            "ram_gb": 100,
            "vcpus": 8,
            "bf16": True,
            "peak_tflops": 312,
            "price_per_hour": 0.05,
        }
    }
    plan, cost2 = select_hardware(
        chat_spec(backend="hf-jobs", flavors=cheap), hf_config("qwen2.5-0.5b"), sft_args(), dataset_report()
    )
    assert plan.flavor == "mygpu" and cost2.usd < cost.usd
    with pytest.raises(CatalogueError, match="flavor 'half' is incomplete"):
        load_catalogue({"half": {"price_per_hour": 1}})
    assert load_catalogue({"a100-large": {"price_per_hour": 9.99}}).get("a100-large").price_per_hour == 9.99


def test_the_catalogue_lists_the_hf_jobs_flavors_with_dated_prices():
    cat = load_catalogue()
    for name in [
        "cpu-basic",
        "t4-small",
        "l4x1",
        "l40sx1",
        "a10g-large",
        "a100-large",
        "h200",
        "rtx-pro-6000",
        "h200x8",
    ]:
        assert name in cat.flavors
    assert cat.get("a100-large").memory_gb == 80 and cat.get("h200").memory_gb == 141
    assert cat.prices_read and "jobs-pricing" in cat.source
    with pytest.raises(CatalogueError, match="unknown hardware flavor 'a200'"):
        cat.get("a200")


def test_the_tiny_model_runs_fully_on_this_machine(tiny_model_path):
    from tasks.core.model_source import load_config

    plan, cost = select_hardware(
        chat_spec(),
        load_config(tiny_model_path),
        sft_args(max_length=128, per_device_train_batch_size=8),
        dataset_report(rows=384, mean=34, longest=36),
    )
    assert plan.backend == "local" and plan.flavor in ("local-cpu", "local-cuda") and plan.mode == "full"
    assert cost.usd == 0 and cost.hours_low < cost.hours < cost.hours_high


def test_training_tokens_follow_epochs_or_max_steps():
    r = dataset_report(rows=1000, mean=100)
    assert training_tokens(r, {"num_train_epochs": 2, "max_length": 1024}) == 200_000
    assert (
        training_tokens(
            r, {"max_steps": 10, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_length": 1024}
        )
        == 8_000
    )
    assert training_tokens(r, {"num_train_epochs": 1, "max_length": 50}) == 50_000  # truncated rows


# --- approval ---------------------------------------------------------------------------


def test_approval_is_automatic_only_when_the_high_estimate_is_under_the_threshold():
    budget = Budget(max_usd=20, auto_approve_usd=2)
    approved = auto_decision(cost_estimate(1.2), budget)
    assert approved is not None and approved.by == "auto" and "within auto_approve_usd" in approved.reason
    assert auto_decision(cost_estimate(1.5), budget) is None  # high end $2.25 > $2: a person decides
    with pytest.raises(BudgetExceeded, match=r"above budget.max_usd \$20.00"):
        auto_decision(cost_estimate(25), budget)


def test_a_persons_answer_decides():
    budget = Budget(max_usd=20, auto_approve_usd=2)
    ok = decision_from_input(ApprovalInput(approve=True, reason="fine", max_usd=10), cost_estimate(5), budget)
    assert ok.by == "user" and ok.max_usd == 10
    with pytest.raises(NotApproved, match="declined: too dear"):
        decision_from_input(ApprovalInput(approve=False, reason="too dear"), cost_estimate(5), budget)
    with pytest.raises(NotApproved, match="below the estimate"):
        decision_from_input(ApprovalInput(approve=True, max_usd=3), cost_estimate(5), budget)


# --- the plan as a whole ----------------------------------------------------------------


def test_dry_run_plan_writes_a_self_contained_script(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    plan = plan_run(chat_spec(name="plan-test", lora=True, training={"max_length": 128}))
    run_dir = Path(plan.run_dir)
    assert {p.name for p in run_dir.iterdir()} >= {"spec.yaml", "plan.json", "train.py", "data"}
    source = Path(plan.script.path).read_text()
    ast.parse(source)
    assert re.search(r"# /// script\n# requires-python.*\n# dependencies = \[\n#   \"torch==", source)
    assert '"trl==1.16.0"' in source and "SFTTrainer" in source and "bitsandbytes" not in source
    imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import | ast.ImportFrom)]
    modules = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0] for n in imports}
    assert not modules & {"tasks", "flows", "training", "deployments"}
    assert "'lora_alpha': 32" in source and "'use_cpu': True" in source
    assert "hf_xxxx" not in source and "hf_xxxx" not in (run_dir / "plan.json").read_text()
    assert plan.hardware.use_lora and plan.cost.usd == 0


def test_cloud_plans_work_in_a_dry_run_from_a_config_only_model_folder(tmp_path):
    model = tmp_path / "llama8"
    model.mkdir()
    shutil.copy(CONFIGS / "llama-3.1-8b.json", model / "config.json")
    plan = plan_run(chat_spec(model=str(model), backend="hf-jobs", name="cloud"))
    assert plan.hardware.accelerator and plan.hardware.mode == "lora" and plan.cost.usd > 0
    assert any("ESTIMATED at 4.0 characters per token (llama family)" in w for w in plan.dataset.warnings)
    source = Path(plan.script.path).read_text()
    recompute = plan.hardware.gradient_checkpointing
    assert "'bf16': True" in source and f"'gradient_checkpointing': {recompute}" in source
    assert plan.hardware.checkpointing_reason.startswith("on: " if recompute else "off: ")


def test_qlora_plans_write_a_4bit_script(tmp_path):
    model = tmp_path / "llama70"
    model.mkdir()
    shutil.copy(CONFIGS / "llama-3.1-70b.json", model / "config.json")
    plan = plan_run(chat_spec(model=str(model), backend="hf-jobs", hardware="h200", name="q70"))
    source = Path(plan.script.path).read_text()
    assert plan.hardware.mode == "qlora" and "'quantization': '4bit'" in source and '"bitsandbytes' in source


def test_training_options_are_checked_against_the_trl_config():
    with pytest.raises(SpecError, match=r"'lerning_rate' \(did you mean 'learning_rate'"):
        plan_run(chat_spec(training={"lerning_rate": 1e-3}))
    for secret in ("hub_token", "hf_token", "token", "wandb_api_key"):
        with pytest.raises(SpecError, match=f"training.{secret} looks like a secret"):
            plan_run(chat_spec(training={secret: "abc"}))
    # options that name a tokenizer's token or count tokens are options, not secrets
    check_training_keys(chat_spec(training={"pad_token": "<|endoftext|>", "include_num_input_tokens_seen": "all"}))


def test_the_trl_config_fields_are_read_once_per_installed_version(tmp_path, monkeypatch):
    import json

    from tasks.core.methods import config_fields

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    assert {"learning_rate", "max_length", "packing"} <= set(config_fields("SFTConfig"))
    (cached,) = (tmp_path / "trl-config-fields").glob("trl-*-transformers-*.json")
    assert "beta" in config_fields("DPOConfig") and "beta" not in config_fields("SFTConfig")
    assert set(json.loads(cached.read_text())) == {"SFTConfig", "DPOConfig"}  # one file per version
    cached.write_text(json.dumps({"SFTConfig": ["only_this"]}))
    assert config_fields("SFTConfig") == ["only_this"]  # read back, TRL not asked again


def test_planning_a_run_again_writes_the_same_script_though_the_machine_measures_differently(tmp_path, monkeypatch):
    """A re-plan (the next run of a name whose flow died) takes over the running job and its
    checkpoints only if the script is the same: nothing measured at planning may enter it."""
    import tasks.plan.flavors as flavors
    from flows.planning import plan_run
    from tasks.core.spec import load_spec
    from tests.helpers import EXAMPLES

    spec = load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "again", "outputs": {"hub_repo": None}})
    peak = [150e9]
    monkeypatch.setattr(flavors, "measured_cpu_flops", lambda: peak[0])
    first = plan_run(spec, runs_root=tmp_path)
    peak[0] = 190e9  # the machine measured again, busier or not
    second = plan_run(spec, runs_root=tmp_path)
    assert first.cost.peak_flops != second.cost.peak_flops
    assert first.script.sha256 == second.script.sha256
    assert first.script.config["yardstick"] == {"useful_flops_per_token": first.cost.useful_flops_per_token}


def test_reusing_a_run_name_with_another_spec_keeps_the_earlier_spec():
    first = plan_run(chat_spec(name="same", training={"max_length": 128}))
    plan_run(chat_spec(name="same", training={"max_length": 128}))  # identical spec: it resumes
    run_dir = Path(first.run_dir)
    assert not (run_dir / "spec.previous.yaml").exists()
    plan_run(chat_spec(name="same", seed=7, training={"max_length": 128}))  # changed: what depends on it runs again
    assert "seed: 7" in (run_dir / "spec.yaml").read_text()
    assert "seed: 7" not in (run_dir / "spec.previous.yaml").read_text()


def test_an_architecture_is_measured_once_per_config_and_read_back(monkeypatch):
    """Measuring needs transformers' modeling code on the meta device (3.5 s of a dry run): it is
    done once per config, LoRA settings and transformers version, and read from the cache folder after."""
    from tasks.export.gguf import config_row_sizes

    config = hf_config("qwen2.5-7b")
    first = Architecture.from_config(config, 16, "auto")
    assert first == Architecture.measured(config, 16, "auto")
    rows = config_row_sizes(config)

    def not_again(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(Architecture, "measured", classmethod(not_again))
    monkeypatch.setattr("torch.device", not_again)  # the meta model for row sizes is not built either
    assert Architecture.from_config(config, 16, "auto") == first and config_row_sizes(config) == rows
    with pytest.raises(AssertionError, match="measured again"):
        Architecture.from_config(config, 8, "auto")  # another LoRA rank is another measurement
