"""How the training script starts: one process stays `python train.py`; several are started by
`accelerate launch` with a config generated next to the script (DDP, or FSDP full shard
wrapping each decoder layer of the architecture). accelerate does the launching and the
sharding; this module only writes its config from the plan.

The script launches itself (`python train.py` re-executes as `accelerate launch --config_file
accelerate.yaml train.py` when its CONFIG asks for several processes), so every backend that
runs the script, here, on Hugging Face Jobs or on a work pool's worker, runs the same launch.
"""

from __future__ import annotations

from typing import Any

import yaml

from tasks.core.models import HardwarePlan

LAUNCH_CONFIG = "accelerate.yaml"


def launch_command(plan: HardwarePlan) -> str:
    if plan.processes <= 1:
        return "python train.py"
    return f"accelerate launch --config_file {LAUNCH_CONFIG} train.py"


def accelerate_config(plan: HardwarePlan) -> dict[str, Any] | None:
    """accelerate's config file for the plan, or None for one process.

    On a CPU, DDP runs over gloo: accelerate's multi-GPU launcher with `use_cpu` starts the
    processes through torch.distributed.run and the Trainer picks gloo for CPU tensors
    (no Intel MPI or oneCCL needed, which accelerate's MULTI_CPU type would want)."""
    if plan.processes <= 1:
        return None
    on_cpu = plan.accelerator is None
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(plan.dtype, "no")
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        # several nodes: each one's rank and the first one's address come at launch, from the
        # PET_* variables the TrainJob's torch runtime sets (train.py passes them to accelerate)
        "num_machines": plan.nodes,
        "machine_rank": 0,
        "num_processes": plan.processes,  # every node's together
        "gpu_ids": "all",
        # 0: torch.distributed picks a free port, so two runs on one machine never collide
        "main_process_port": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "no" if on_cpu else precision,
        "use_cpu": on_cpu,
    }
    if plan.strategy == "fsdp":
        if not plan.layer_classes:
            raise ValueError(
                f"FSDP needs the decoder layer class to wrap, and the {plan.model_type} model declares none "
                "(_no_split_modules); use distributed.strategy: ddp"
            )
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(plan.layer_classes),
            "fsdp_reshard_after_forward": True,  # full shard: parameters gathered per layer, then freed
            # checkpoints in shards, each process writing its own (gathering a 72B model's optimizer
            # state into one process would need a terabyte of its host's memory); the script gathers
            # the whole model once at the end, so the saved model loads without accelerate
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            # CPU offload: parameter shards, their gradients and the optimizer state on the host
            "fsdp_offload_params": plan.offload,
            "fsdp_activation_checkpointing": plan.gradient_checkpointing,
        }
    return config


def render_launch_config(launch: dict[str, Any]) -> str:
    """The YAML file next to train.py, from the script CONFIG's `launch` (so the two never differ)."""
    header = (
        f"# accelerate's config for this run: {launch['processes']} processes, {launch['strategy']}.\n"
        f"# `python train.py` runs `accelerate launch --config_file {LAUNCH_CONFIG} train.py` itself.\n"
    )
    return header + yaml.safe_dump(launch["accelerate"], sort_keys=False)
