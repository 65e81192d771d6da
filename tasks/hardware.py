"""Stage 2: size the run (parameters, peak memory, LoRA or not) and pick where it runs.

Parameters are counted from the model's config on PyTorch's meta device (no weights are
read or allocated), so the count is exact for any architecture transformers knows.
The memory model is a first-order one (weights, gradients and AdamW states for what is
trained, activations per token); its calibration against measurement is tracked
separately and its assumptions are written into the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tasks.models import HardwarePlan
from tasks.spec import RunSpec

GB = 1024**3
# Above this many parameters `lora: auto` trains an adapter even when full fine-tuning fits:
# full updates of multi-billion models rarely pay for their optimizer memory.
LORA_AUTO_THRESHOLD = 3_000_000_000
# Leave this share of memory free for the allocator, the OS and fragmentation.
SAFETY_MARGIN = 0.8
# Bytes of activations kept per token, per layer, per hidden unit, without checkpointing
# (attention, MLP and norms in float32 on the CPU; see Korthikanti et al. 2022, table 2).
ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN = 34
RUNTIME_OVERHEAD_GB = 0.5


class HardwareError(ValueError):
    """No placement fits; the message says what would."""


@dataclass(frozen=True)
class ParameterCount:
    total: int
    lora_trainable: int


def count_parameters(config: Any, lora_r: int, target_modules: list[str] | str) -> ParameterCount:
    """Exact parameter counts on the meta device, plus what a LoRA of rank r would train."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings()
    lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear" or leaf in target_modules:
            lora += lora_r * (module.in_features + module.out_features)
    return ParameterCount(total=total, lora_trainable=lora)


def local_machine() -> dict[str, Any]:
    """What this machine offers: its GPU if torch sees one, else its CPU and RAM."""
    import torch

    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "flavor": "local-cuda",
            "accelerator": props.name,
            "count": torch.cuda.device_count(),
            "memory_gb": props.total_memory / GB,
            "bf16": torch.cuda.is_bf16_supported(),
            "cpus": cpus,
            "ram_gb": ram_gb,
        }
    return {
        "flavor": "local-cpu",
        "accelerator": None,
        "count": 0,
        "memory_gb": None,
        "bf16": False,
        "cpus": cpus,
        "ram_gb": ram_gb,
    }


def estimate_memory_gb(
    config: Any,
    params: ParameterCount,
    use_lora: bool,
    dtype_bytes: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
) -> dict[str, float]:
    trained = params.lora_trainable if use_lora else params.total
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = micro_batch * seq_len
    per_layer = tokens * hidden * ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN * dtype_bytes / 4
    if checkpointing:  # only each layer's input is kept, plus one layer recomputed at a time
        activations = tokens * hidden * dtype_bytes * layers + per_layer
    else:
        activations = per_layer * layers
    logits = tokens * vocab * 4 * 2  # float32 logits and their gradient
    return {
        "weights": params.total * dtype_bytes / GB,
        "gradients": trained * (4 if use_lora else dtype_bytes) / GB,
        "optimizer": trained * 8 / GB,  # AdamW: two float32 moments
        "activations": (activations + logits) / GB,
        "runtime": RUNTIME_OVERHEAD_GB,
    }


def select_hardware(spec: RunSpec, config: Any, training_args: dict[str, Any]) -> HardwarePlan:
    if spec.backend != "local":
        raise HardwareError(
            f"backend '{spec.backend}' is not available yet: planning and submission for it arrive "
            "with the GPU flavor catalogue. Use backend: local for now."
        )
    if spec.hardware not in ("auto", "local"):
        raise HardwareError(
            f"hardware '{spec.hardware}' names a cloud flavor, but backend: local runs on this machine; "
            "set hardware: auto (or local)"
        )
    machine = local_machine()
    on_gpu = machine["accelerator"] is not None
    dtype = "bfloat16" if machine["bf16"] else "float32"
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    lora = spec.lora
    params = count_parameters(config, lora.r, lora.target_modules)
    available = (machine["memory_gb"] if on_gpu else machine["ram_gb"]) * SAFETY_MARGIN

    def plan_memory(use_lora: bool) -> dict[str, float]:
        return estimate_memory_gb(
            config,
            params,
            use_lora,
            dtype_bytes,
            int(training_args.get("per_device_train_batch_size", 1)),
            int(training_args.get("max_length", 1024)),
            bool(training_args.get("gradient_checkpointing", False)),
        )

    full, with_lora = plan_memory(False), plan_memory(True)
    if lora.enabled is True:
        use_lora, reason = True, "requested in the spec (lora: true)"
    elif lora.enabled is False:
        use_lora, reason = False, "disabled in the spec (lora: false)"
    elif params.total > LORA_AUTO_THRESHOLD:
        use_lora, reason = (
            True,
            f"auto: {params.total / 1e9:.1f}B parameters is above the {LORA_AUTO_THRESHOLD / 1e9:.0f}B full fine-tuning threshold",
        )
    elif sum(full.values()) > available:
        use_lora, reason = (
            True,
            f"auto: full fine-tuning needs {sum(full.values()):.1f} GB, more than the {available:.1f} GB usable",
        )
    else:
        use_lora, reason = (
            False,
            f"auto: full fine-tuning fits ({sum(full.values()):.2f} GB of {available:.1f} GB usable)",
        )
    breakdown = with_lora if use_lora else full
    peak = sum(breakdown.values())
    if peak > available:
        raise HardwareError(
            f"the run needs about {peak:.1f} GB but this machine offers {available:.1f} GB usable "
            f"({'GPU' if on_gpu else 'RAM'}, {SAFETY_MARGIN:.0%} of total). Try a smaller max_length or "
            "per_device_train_batch_size, lora: true, or a bigger machine."
        )
    if on_gpu:
        desc = f"this machine: {machine['count']}x {machine['accelerator']} ({machine['memory_gb']:.0f} GB)"
    else:
        desc = f"this machine: CPU only, {machine['cpus']} cores, {machine['ram_gb']:.0f} GB RAM"
    return HardwarePlan(
        backend=spec.backend,
        flavor=machine["flavor"],
        description=desc,
        accelerator=machine["accelerator"],
        accelerator_count=machine["count"],
        accelerator_memory_gb=round(machine["memory_gb"], 2) if machine["memory_gb"] else None,
        cpu_count=machine["cpus"],
        ram_gb=round(machine["ram_gb"], 2),
        parameters=params.total,
        trainable_parameters=params.lora_trainable if use_lora else params.total,
        dtype=dtype,  # type: ignore[arg-type]
        use_lora=use_lora,
        lora_reason=reason,
        memory_breakdown_gb={k: round(v, 4) for k, v in breakdown.items()},
        estimated_peak_memory_gb=round(peak, 3),
        available_memory_gb=round(available, 2),
        fits=True,
    )
