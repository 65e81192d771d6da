"""Planning beyond one GPU: data parallel (each GPU holds the whole model state) and sharded
(FSDP full shard) placements on 2-8 GPU flavors, compared with single-GPU ones by total cost,
and the accelerate config the script launches with. Expected numbers are worked out here by
hand from the architecture, the flavor and the stated constants."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import yaml

from flows.planning import plan_run
from tasks.core.money import usd
from tasks.plan.cost import SCALING_EFFICIENCY, STEP_OVERHEAD_S, UTILISATION
from tasks.plan.flavors import load_catalogue
from tasks.plan.hardware import HardwareError, select_hardware
from tasks.plan.memory import (
    COMM_BUFFERS_GB,
    GB,
    HOST_PROCESS_GB,
    Architecture,
    Workload,
    flops_per_token,
    memory_breakdown_gb,
)
from tasks.report.render import _hardware_lines, plan_markdown
from tests.helpers import CONFIGS, chat_spec, dataset_report, hf_config, sft_args


def test_a_decoder_layer_is_the_unit_fsdp_gathers():
    config = hf_config("llama-3.1-8b")
    arch = Architecture.from_config(config)
    root = 2 * config.vocab_size * config.hidden_size + config.hidden_size  # embeddings, untied head, final norm
    assert arch.layer_params * config.num_hidden_layers == arch.params - root
    assert arch.layer_classes == ("LlamaDecoderLayer",)


def test_an_8b_full_fine_tune_is_sharded_over_two_h200_with_the_memory_and_cost_worked_by_hand():
    config, report = hf_config("llama-3.1-8b"), dataset_report()
    spec = chat_spec(backend="hf-jobs", hardware="h200x2", lora=False)
    plan, cost = select_hardware(spec, config, sft_args(per_device_train_batch_size=1), report)
    assert (plan.strategy, plan.processes) == ("fsdp", 2)
    assert "data parallel needs" in plan.strategy_reason and "sharded" in plan.strategy_reason

    arch = Architecture.from_config(config)
    p, n = arch.params, 2
    m = plan.memory_breakdown_gb
    assert m["weights"] == pytest.approx(p * 2 / n / GB, rel=1e-4)
    assert m["gradients"] == pytest.approx(p * 2 / n / GB, rel=1e-4)
    assert m["optimizer"] == pytest.approx(p * 8 / n / GB, rel=1e-4)
    assert m["optimizer step"] == pytest.approx(p * 4 / n / GB, rel=1e-4)
    layer, root = arch.layer_params, p - arch.layers * arch.layer_params
    assert m["fsdp all-gather"] == pytest.approx(((2 * layer + root) * 2 + layer * 2) / GB, rel=1e-4)
    assert m["communication"] == COMM_BUFFERS_GB
    # activations and logits are each GPU's own micro-batch, as on one GPU
    one = memory_breakdown_gb(
        arch, Workload(mode="full", micro_batch=1, seq_len=1024, checkpointing=plan.gradient_checkpointing), "gpu"
    )
    assert m["activations"] == one["activations"] and m["logits"] == one["logits"]
    assert plan.estimated_peak_memory_gb == pytest.approx(sum(m.values()), abs=1e-3)
    assert plan.estimated_peak_memory_gb <= 141 * 0.9

    # time: the tokens' FLOPs over both GPUs' peak at the stated utilisation and scaling efficiency
    w = Workload(mode="full", seq_len=1024, checkpointing=plan.gradient_checkpointing, strategy="fsdp", processes=2)
    tokens = report.train_rows * report.tokens.mean
    flops = tokens * plan.padding_overhead * flops_per_token(arch, w)
    steps = math.ceil(report.train_rows / (plan.micro_batch * n))
    compute = flops / (989e12 * n * SCALING_EFFICIENCY["gpu"]["fsdp"] * UTILISATION["gpu"]["full"])
    assert cost.compute_s == pytest.approx(compute + steps * STEP_OVERHEAD_S["gpu"], rel=1e-3)
    # the flavor's price pays for both GPUs: $10/h, $5 per GPU
    assert cost.price_per_hour_usd == 10.0 and cost.usd == pytest.approx(cost.hours * 2 * 5.0)
    assert "x 2 GPUs x 80% scaling efficiency (fsdp)" in cost.basis and "for all 2 GPUs ($5.00 per GPU)" in cost.basis


def test_data_parallel_keeps_the_whole_model_state_on_every_gpu():
    config = hf_config("qwen2.5-0.5b")
    plan, _ = select_hardware(chat_spec(backend="hf-jobs", hardware="a100x4"), config, sft_args(), dataset_report())
    assert (plan.strategy, plan.processes, plan.mode) == ("ddp", 4, "full")
    assert "each process holds the whole model state" in plan.strategy_reason
    arch = Architecture.from_config(config)
    m = plan.memory_breakdown_gb
    assert m["weights"] == pytest.approx(arch.params * 2 / GB, rel=1e-4)
    assert m["ddp gradient buckets"] == pytest.approx(m["gradients"], rel=1e-6)  # DDP's bucketed copy
    # the spec's global batch of 4 is divided among the 4 processes, not multiplied by them
    assert plan.micro_batch * plan.accumulation * plan.processes == 4 == plan.global_batch


def test_selection_weighs_single_and_multi_gpu_placements_by_total_cost_and_max_hours():
    config, report = hf_config("qwen2.5-0.5b"), dataset_report(rows=400_000)
    cheapest, cost = select_hardware(chat_spec(backend="hf-jobs"), config, sft_args(), report)
    assert cheapest.processes == 1  # several GPUs buy time, not money: scaling below 1 costs more in total
    in_time = chat_spec(
        backend="hf-jobs", budget={"max_usd": 500, "auto_approve_usd": 1, "max_hours": cost.hours_high / 3}
    )
    faster, fast_cost = select_hardware(in_time, config, sft_args(), report)
    assert faster.processes > 1 and fast_cost.hours_high <= cost.hours_high / 3
    assert fast_cost.usd > cost.usd
    fitting = [o for o in faster.alternatives if o.usd < fast_cost.usd - 1e-9]
    assert fitting == []  # nothing that fits the hours is cheaper


def test_a_70b_full_fine_tune_without_offload_says_how_many_gpus_sharding_would_need_and_what_fits_instead():
    with pytest.raises(HardwareError) as e:
        select_hardware(
            chat_spec(backend="hf-jobs", lora=False, distributed={"offload": "off"}),
            hf_config("llama-3.1-70b"),
            sft_args(per_device_train_batch_size=1),
            dataset_report(),
        )
    msg = str(e.value)
    arch = Architecture.from_config(hf_config("llama-3.1-70b"))
    state_gb = arch.params * (2 + 2 + 8 + 4) / GB  # weights, gradients, AdamW moments, its step's temporary
    assert f"the model state is {state_gb:.0f} GB" in msg and "fsdp over 8 processes" in msg
    assert "- backend: kubernetes trains across machines (a Kubeflow Trainer TrainJob): full, fsdp over" in msg
    assert "- lora: auto (or true/qlora) trains an adapter and needs far less memory: fits on" in msg


def test_processes_follow_the_gpus_of_the_flavor():
    with pytest.raises(HardwareError, match="a run uses one process per GPU"):
        select_hardware(
            chat_spec(backend="hf-jobs", hardware="a100x4", distributed={"processes": 2}),
            hf_config("qwen2.5-0.5b"),
            sft_args(),
            dataset_report(),
        )
    plan, _ = select_hardware(
        chat_spec(backend="hf-jobs", distributed={"processes": 8, "strategy": "fsdp"}),
        hf_config("qwen2.5-0.5b"),
        sft_args(),
        dataset_report(),
    )
    assert plan.processes == 8 and plan.strategy == "fsdp" and "set in the spec" in plan.strategy_reason
    assert load_catalogue().get(plan.flavor).count == 8


def test_two_processes_on_this_cpu_hold_two_copies_in_its_memory(tiny_model_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_path)
    one, _ = select_hardware(
        chat_spec(), config, sft_args(max_length=128), dataset_report(rows=200, mean=60, longest=128)
    )
    two, cost = select_hardware(
        chat_spec(distributed={"processes": 2}),
        config,
        sft_args(max_length=128),
        dataset_report(rows=200, mean=60, longest=128),
    )
    assert (two.processes, two.strategy) == (2, "ddp") and one.processes == 1
    assert "gloo" in two.strategy_reason and "no faster than one process" in two.strategy_reason
    assert two.memory_breakdown_gb["runtime"] == pytest.approx(2 * one.memory_breakdown_gb["runtime"])
    assert "shared by 2 processes" in cost.basis
    with pytest.raises(HardwareError, match="fsdp needs GPUs"):  # accelerate would quietly train it as DDP
        select_hardware(
            chat_spec(distributed={"processes": 2, "strategy": "fsdp"}),
            config,
            sft_args(max_length=128),
            dataset_report(rows=200),
        )


def test_a_multi_gpu_plan_writes_the_accelerate_config_next_to_the_script(tmp_path):
    model = tmp_path / "llama8"
    model.mkdir()
    shutil.copy(CONFIGS / "llama-3.1-8b.json", model / "config.json")
    plan = plan_run(chat_spec(model=str(model), backend="hf-jobs", hardware="h200x2", lora=False, name="fsdp8"))
    run_dir = Path(plan.run_dir)
    launch = yaml.safe_load((run_dir / "accelerate.yaml").read_text())
    assert launch["num_processes"] == 2 and launch["distributed_type"] == "FSDP" and launch["use_cpu"] is False
    fsdp = launch["fsdp_config"]
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"] is True
    # checkpoints in shards, one per process; the script gathers the whole model once, at the end
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_offload_params"] is False
    source = (run_dir / "train.py").read_text()
    assert "'processes': 2" in source and "'strategy': 'fsdp'" in source
    markdown = plan_markdown(plan)
    assert "accelerate launch --config_file accelerate.yaml train.py" in markdown
    single = plan_run(chat_spec(model=str(model), backend="hf-jobs", hardware="h200", name="one"))
    assert single.hardware.processes == 1 and not (Path(single.run_dir) / "accelerate.yaml").exists()
    assert "'launch': None" in Path(single.script.path).read_text()


def test_a_72b_full_fine_tune_is_sharded_across_nodes_where_the_backend_can_launch_them():
    """Kubernetes (a Kubeflow Trainer TrainJob) trains across machines: the 72B full fine-tune no
    machine of the catalogue holds is sharded over several nodes, every node paid for."""
    config, report = hf_config("qwen2.5-72b"), dataset_report()
    plan, cost = select_hardware(chat_spec(backend="kubernetes", lora=False), config, sft_args(), report)
    arch = Architecture.from_config(config)
    assert arch.params == 72_706_203_648  # Qwen2.5-72B, as published
    flavor = load_catalogue().get(plan.flavor)
    assert plan.strategy == "fsdp" and plan.nodes > 1 and plan.processes == plan.nodes * flavor.count
    m = plan.memory_breakdown_gb
    assert m["weights"] == pytest.approx(arch.params * 2 / plan.processes / GB, rel=1e-4)
    assert plan.estimated_peak_memory_gb <= flavor.memory_gb * 0.9
    # the whole model state, as LLaMA-Factory's hardware table puts a 70B full fine-tune (bf16): about 1200 GB
    state = (
        sum(v for k, v in m.items() if k in ("weights", "gradients", "optimizer", "optimizer step")) * plan.processes
    )
    assert 1000 < state * GB / 1e9 < 1300
    assert cost.price_per_hour_usd == flavor.price_per_hour * plan.nodes and cost.usd == pytest.approx(
        cost.hours * flavor.price_per_hour * plan.nodes
    )
    assert (
        f"{plan.nodes} nodes of {plan.flavor}" in plan.strategy_reason
        and "sharded on 1 node: needs" in plan.strategy_reason
    )
    assert f"{usd(cost.price_per_hour_usd)}/h for {plan.nodes} nodes ({usd(flavor.price_per_hour)} each)" in cost.basis
    assert "cross a 400 Gb/s network card per GPU at 90%" in cost.basis


def test_cpu_offload_is_weighed_and_kept_only_when_it_is_the_fit_or_cheaper():
    """On one machine (hf-jobs) the 72B full fine-tune fits only with FSDP's CPU offload: the
    parameter shards, gradients and optimizer state in host memory, the optimizer step on the host,
    and the copies over PCIe in the time. Ruled out, the refusal names the machines it would take."""
    config, report, args = hf_config("qwen2.5-72b"), dataset_report(), sft_args()
    plan, cost = select_hardware(chat_spec(backend="hf-jobs", lora=False), config, args, report)
    arch = Architecture.from_config(config)
    flavor = load_catalogue().get(plan.flavor)
    assert plan.offload and plan.nodes == 1 and plan.strategy == "fsdp"
    assert not {"weights", "gradients", "optimizer"} & set(plan.memory_breakdown_gb)  # on the host instead
    host = plan.host_memory_breakdown_gb
    assert host["offloaded model state"] == pytest.approx(arch.params * (2 + 2 + 8 + 4) / GB, rel=1e-3)
    assert host["training processes"] == HOST_PROCESS_GB * flavor.count
    assert sum(host.values()) <= flavor.ram_gb * 0.9 == plan.available_host_memory_gb
    assert "with CPU offload" in plan.strategy_reason and "host memory per node" in plan.strategy_reason
    assert "CPU offload: shards over PCIe at 25 GB/s and AdamW on the host" in cost.basis
    assert "host memory per node (CPU offload)" in "\n".join(_hardware_lines(plan))

    with pytest.raises(HardwareError) as e:
        select_hardware(chat_spec(backend="hf-jobs", lora=False, distributed={"offload": "off"}), config, args, report)
    assert "- backend: kubernetes trains across machines (a Kubeflow Trainer TrainJob): full, fsdp over" in str(e.value)

    # where more GPUs are cheaper, offload is weighed and said to cost more
    lora, _ = select_hardware(chat_spec(backend="hf-jobs", lora=True), config, args, report)
    assert not lora.offload and "with CPU offload: $" in lora.strategy_reason and "more than" in lora.strategy_reason


def test_a_405b_full_fine_tune_is_planned_across_nodes_with_its_host_memory():
    config = hf_config("llama-3.1-405b")
    assert Architecture.from_config(config).params == 405_853_388_800  # Llama 3.1 405B, as published
    plan, cost = select_hardware(chat_spec(backend="kubernetes", lora=False), config, sft_args(), dataset_report())
    assert plan.strategy == "fsdp" and plan.nodes >= 4 and plan.mode == "full"
    flavor = load_catalogue().get(plan.flavor)
    assert plan.estimated_peak_memory_gb <= flavor.memory_gb * 0.9
    if plan.offload:
        assert 0 < sum(plan.host_memory_breakdown_gb.values()) <= flavor.ram_gb * 0.9
    assert cost.hours_high <= 24  # budget.max_hours
    with pytest.raises(HardwareError, match="distributed.nodes is 2, and backend: hf-jobs trains on one machine"):
        select_hardware(chat_spec(backend="hf-jobs", distributed={"nodes": 2}), config, sft_args(), dataset_report())


def test_a_plan_across_nodes_with_offload_writes_it_into_the_launch():
    from tasks.plan.launch import accelerate_config

    plan, _ = select_hardware(
        chat_spec(backend="kubernetes", lora=False, distributed={"nodes": 2, "offload": "on"}),
        hf_config("qwen2.5-72b"),
        sft_args(),
        dataset_report(),
    )
    assert plan.nodes == 2 and plan.offload and plan.processes == 2 * plan.accelerator_count
    launch = accelerate_config(plan)
    assert launch["num_machines"] == 2 and launch["num_processes"] == plan.processes  # every node's together
    assert launch["fsdp_config"]["fsdp_offload_params"] is True
