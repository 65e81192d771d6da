"""What the run will take, in hours and dollars, as a range.

hours = start-up + (training tokens x FLOPs per token) / (peak FLOP/s x utilisation)
        [+ for a generating method (GRPO), sampling the completions, at a lower utilisation]

- training tokens come from the dataset report (rows x mean tokens x epochs, or max_steps
  x batch), FLOPs per token from the memory model's architecture (tasks/plan/memory.py);
- the peak is the flavor's dense bf16 peak from the catalogue, or, on this machine, a
  matrix multiply measured on the spot;
- utilisation: UTILISATION, by device and by what is trained (assumed on GPUs,
  calibrated on CPUs by benchmarks/calibrate.py against measured step times);
- start-up: process start, model download and saving (cloud), stated separately.
The range is RANGE_LOW..RANGE_HIGH times the estimate; USD is hours x the hourly price.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from tasks.core.methods import cut_length, method_definition
from tasks.core.models import CostEstimate, DatasetReport, HardwarePlan, SplitRate
from tasks.core.money import usd
from tasks.core.spec import runs_on_this_machine
from tasks.plan.calibration import Correction, load_table
from tasks.plan.flavors import Flavor, load_catalogue, local_flavor
from tasks.plan.memory import Architecture, Placement, Workload, flops_per_token, trained_parameters, workload_for

# Share of the peak a training step achieves, by what is trained. On GPUs an assumption
# (typical single-GPU TRL runs; no GPU was available to calibrate); adapters run at a lower
# share of their (smaller) FLOPs because of their many small extra operations, QLoRA lower
# still for dequantizing weights. On CPUs calibrated: benchmarks/results/calibration.md.
UTILISATION = {
    "gpu": {"full": 0.35, "lora": 0.25, "qlora": 0.18},
    "cpu": {"full": 0.44, "lora": 0.26, "qlora": 0.26},
}
GENERATION_UTILISATION = {"hf": 0.03, "vllm": 0.25}  # token-by-token decoding is memory-bound
# Share of N processes' combined peak that a multi-process run achieves (gradient all-reduce,
# FSDP's all-gathers and reduce-scatters not hidden behind compute). On GPUs an assumption for
# one machine's NVLink/PCIe (no multi-GPU machine was lent to measure it). On a CPU the
# processes split the same cores, so the peak is the machine's, not N times it, and the share is
# measured: 2 processes on 2 cores reached 0.70 of one process's tokens per second on the tiny
# model (benchmarks/results/multi-process-cpu.md, `python -m benchmarks.multi_process`). FSDP
# does not run on a CPU (accelerate trains it as DDP), so it has no CPU figure.
SCALING_EFFICIENCY = {
    "gpu": {"ddp": 0.90, "fsdp": 0.80},
    "cpu": {"ddp": 0.70},
}
# Across machines (several nodes), FSDP all-gathers the parameters for the forward and again for
# the backward, and reduce-scatters the gradients, every micro-step. Each node receives the other
# nodes' share of them, (nodes - 1) / nodes, through all its GPUs' network cards at once (one per
# GPU, as in NVIDIA's DGX H100/H200 design: the flavor's network_gbps per GPU), at
# NETWORK_EFFICIENCY of line rate (nccl-tests' bus bandwidth on InfiniBand, NVIDIA/nccl-tests
# doc/PERFORMANCE.md; assumed, no cluster was lent to measure it). FSDP prefetches the next layer
# while computing this one, so a micro-step takes the longer of its compute and its traffic.
NETWORK_EFFICIENCY = 0.9
# FSDP's CPU offload: every micro-step each process copies its parameter shard to the GPU for the
# forward and the backward and its gradient shard back, over PCIe at PCIE_GB_S (assumed: half of
# PCIe Gen5 x16's ~50 GB/s, as not every copy is pinned and the link is shared with the network
# card); every optimizer step runs AdamW on the host, at CPU_ADAM_PARAMS_PER_CORE_S per physical
# core (measured, benchmarks/results/cpu-optimizer.md) up to what the node's memory bandwidth
# allows (HOST_MEMORY_GB_S, assumed for a two-socket server; AdamW reads and writes ADAM_HOST_BYTES
# per parameter in bf16: parameter, gradient and two moments read, three written). Not overlapped.
PCIE_GB_S = 25.0
CPU_ADAM_PARAMS_PER_CORE_S = 376e6
HOST_MEMORY_GB_S = 200.0
ADAM_HOST_BYTES = 14
RANGE_LOW, RANGE_HIGH = 0.75, 1.5
# Fixed cost of one micro-step (optimizer update, data collation, Python): calibrated on CPU,
# where it dominates tiny models; an assumption on GPUs.
STEP_OVERHEAD_S = {"cpu": 0.03, "gpu": 0.02}
LOCAL_STARTUP_S = 8.0  # interpreter, library imports, tokenizing (measured on the tiny demo)
CLOUD_STARTUP_S = 180.0  # scheduling and container start on a job runner
DOWNLOAD_BYTES_PER_S = 100e6
CHECKPOINT_BYTES_PER_PARAM = 2


def cut_mean(report: DatasetReport, max_length: int) -> float:
    """A row's mean tokens once rows are cut at max_length: the mean of min(length, max_length),
    from the measured length percentiles (min(mean, max_length) would count every long row's
    cut-off tokens as if the short rows had them)."""
    points = report.length_percentiles
    if report.tokens.max <= max_length or not points or not sum(points):
        return min(report.tokens.mean, float(max_length))
    return report.tokens.mean * sum(min(p, max_length) for p in points) / sum(points)


def training_tokens(report: DatasetReport, args: dict[str, Any], processes: int = 1) -> int:
    """Tokens the trainer will process (each row padded to no more than max_length), all processes
    together: with max_steps each optimizer step sees every process's batch."""
    per_row = cut_mean(report, cut_length(args, report.max_length))
    max_steps = int(args.get("max_steps", -1) or -1)
    if max_steps > 0:
        rows = (
            max_steps
            * int(args.get("per_device_train_batch_size", 1))
            * int(args.get("gradient_accumulation_steps", 1))
            * processes
        )
    else:
        rows = report.train_rows * float(args.get("num_train_epochs", 1))
    return int(rows * per_row)


def evaluation_work(
    method: str, report: DatasetReport, args: dict[str, Any], generations: int, models: int = 2
) -> tuple[int, int]:
    """Tokens the evaluation scores and generates, all `models` together (base and trained, and
    a recipe's baseline): every held-out row once per model (pairs: chosen and rejected), plus
    the side-by-side answers (a generating method: a greedy and a sampled completion per row)."""
    definition = method_definition(method)
    held = report.heldout_rows
    per_row = cut_mean(report, cut_length(args, report.max_length))
    if definition.generates:
        return 0, models * held * 2 * int(args.get("max_completion_length", 256))
    answers = min(generations, held) * int(args.get("max_completion_length", 48))
    return int(models * held * per_row * definition.sequences_per_row), models * answers


def evaluation_total(spec: Any, report: DatasetReport, args: dict[str, Any]) -> tuple[int, int]:
    """The held-out evaluation (with a recipe's baseline) plus the task evaluations, which run
    on the base and the trained model."""
    from tasks.evaluate.harness import task_work

    scored, generated = evaluation_work(
        spec.method, report, args, spec.evaluation.generations, 3 if spec.evaluation.baseline else 2
    )
    task_scored, task_generated = task_work(list(spec.evaluation.tasks))
    return scored + 2 * task_scored, generated + 2 * task_generated


def training_steps(report: DatasetReport, args: dict[str, Any], processes: int = 1) -> int:
    """Micro-steps of each process: max_steps x accumulation, or rows x epochs / (micro-batch x
    processes) (the last batch of an epoch may be short, as the Trainer's is)."""
    batch = int(args.get("per_device_train_batch_size", 1))
    max_steps = int(args.get("max_steps", -1) or -1)
    if max_steps > 0:
        return max_steps * int(args.get("gradient_accumulation_steps", 1))
    return max(1, math.ceil(report.train_rows * float(args.get("num_train_epochs", 1)) / (batch * processes)))


class _TrainingTime(NamedTuple):
    """The training's compute time (before calibration) and the figures its basis quotes."""

    tokens: float  # tokens trained on (GRPO: every prompt's completions, whole sequences)
    generated: float  # tokens GRPO generates (0 for the other methods)
    generation_s: float
    flops: float
    utilisation: float
    scaling: float  # the share of the processes' combined peak a multi-process run achieves
    seconds: float
    network_s: float = 0.0  # FSDP's traffic between nodes, where it outlasts the compute it overlaps
    offload_s: float = 0.0  # FSDP's CPU offload: the copies over PCIe and the optimizer on the host


def estimate_for(
    arch: Architecture,
    w: Workload,
    tokens: int,
    flavor: Flavor,
    backend: str,
    steps: int = 0,
    padding: float = 1.0,
    accumulation: int = 1,
    evaluation: tuple[int, int] = (0, 0),
    measured: SplitRate | None = None,
    attended: float | None = None,
) -> CostEstimate:
    """`tokens` are real tokens; `padding` is the tokens computed per real token (the batching's);
    `steps` are micro-steps; `evaluation` is (tokens scored, tokens generated) by the before/after
    evaluation, both models together. Measured runs of the same flavor, family and mode scale
    the modelled training time; a split timed on this machine (`measured`) replaces it.
    `attended`: the length of a real token's row on average, what its useful attention spans."""
    modelled = _training_time(arch, w, tokens, flavor, steps, padding, accumulation)
    useful = 0.0 if w.generates else _useful_flops_per_token(arch, w, attended)
    peak_flops = flavor.peak_tflops * 1e12 * (w.processes if flavor.is_gpu else w.nodes)
    training = _measured_time(modelled, measured, padding, useful / peak_flops) if measured else modelled
    correction = None if measured else load_table().find(flavor.name, arch.model_type, w.mode)
    factor = correction.time_factor if correction else 1.0
    compute_s = training.seconds * factor
    evaluation_s = _evaluation_s(arch, flavor, training.utilisation, evaluation)
    startup_s = _startup_s(arch, backend)
    hours = (compute_s + evaluation_s + startup_s) / 3600
    price = flavor.price_per_hour * w.nodes  # every node is paid for
    head = (
        _measured_basis(training, measured, padding)
        if measured
        else _modelled_basis(arch, w, flavor, training, padding, steps, correction)
    )
    basis = head + _basis(w, flavor, training, evaluation, evaluation_s, startup_s)
    return CostEstimate(
        flavor=flavor.name,
        price_per_hour_usd=price,
        tokens=int(training.tokens),
        estimated_flops=training.flops,
        utilisation=training.utilisation,
        startup_s=startup_s,
        compute_s=compute_s,
        modelled_compute_s=modelled.seconds,
        evaluation_s=evaluation_s,
        optimizer_steps=max(1, math.ceil(steps / max(1, accumulation))),
        useful_flops_per_token=useful,
        peak_flops=peak_flops,
        time_factor=factor,
        calibration=_calibration_note(correction, flavor, arch, w),
        hours=hours,
        hours_low=hours * RANGE_LOW,
        hours_high=hours * RANGE_HIGH,
        usd=hours * price,
        usd_low=hours * RANGE_LOW * price,
        usd_high=hours * RANGE_HIGH * price,
        basis=basis,
    )


def _calibration_note(correction: Correction | None, flavor: Flavor, arch: Architecture, w: Workload) -> str:
    if correction is None:
        return ""
    return (
        f"time x{correction.time_factor:.2f}: measured / estimated on {correction.runs} earlier {flavor.name} "
        f"{arch.model_type} {w.mode} run(s)"
    )


def _training_time(
    arch: Architecture, w: Workload, tokens: int, flavor: Flavor, steps: int, padding: float, accumulation: int = 1
) -> _TrainingTime:
    """The training's FLOPs over the peak it achieves (every GPU's, less what communication
    costs; a CPU's processes share its cores), plus a generating method's sampling and each micro-step's
    fixed cost."""
    device = "gpu" if flavor.is_gpu else "cpu"
    utilisation = UTILISATION[device][w.mode]
    peak = flavor.peak_tflops * 1e12
    scaling = SCALING_EFFICIENCY[device][w.strategy] if w.processes > 1 else 1.0
    train_peak = peak * (w.processes if flavor.is_gpu else w.nodes) * scaling  # a CPU's processes share it
    gen_tokens = 0.0
    if w.generates:
        # tokens counts prompts' tokens; each prompt gets num_generations completions
        prompts = tokens / max(w.seq_len - w.completion_len, 1)
        train_tokens = prompts * w.num_generations * w.seq_len
        gen_tokens = prompts * w.num_generations * w.completion_len
        gen_util = GENERATION_UTILISATION["vllm" if w.vllm_gpu_fraction else "hf"]
        gen_s = gen_tokens * 2 * arch.matmul_params / (train_peak * gen_util)
    else:
        train_tokens, gen_s = tokens, 0.0
    flops = train_tokens * padding * flops_per_token(arch, w)
    compute_s = flops / (train_peak * utilisation)
    optimizer_steps = math.ceil(steps / max(accumulation, 1))
    network_s = max(0.0, _network_s(arch, w, flavor, steps, optimizer_steps) - compute_s)
    offload_s = steps * _offload_s_per_micro_step(arch, w) + optimizer_steps * _host_adam_s(arch, w, flavor)
    seconds = compute_s + network_s + offload_s + gen_s + steps * STEP_OVERHEAD_S[device]
    return _TrainingTime(train_tokens, gen_tokens, gen_s, flops, utilisation, scaling, seconds, network_s, offload_s)


def _useful_flops_per_token(arch: Architecture, w: Workload, attended: float | None) -> float:
    """What a real token needs: the forward and backward without recomputation, attention over
    its own row (not the longest row, nor a padding-free batch's concatenated rows)."""
    seq_len = max(1, round(attended)) if attended else w.seq_len
    return flops_per_token(arch, w.model_copy(update={"checkpointing": False, "seq_len": seq_len}))


def attended_length(report: DatasetReport, max_length: int) -> float:
    """The length of a real token's row on average, E[s^2] / E[s] over the rows' lengths (a long
    row holds more tokens, each attending over more), cut at max_length; from the percentiles."""
    lengths = [min(p, max_length) for p in report.length_percentiles]
    return sum(x * x for x in lengths) / sum(lengths) if sum(lengths) else float(max_length)


def _measured_time(modelled: _TrainingTime, rate: SplitRate, padding: float, peak_s_per_token: float) -> _TrainingTime:
    """The training at the rate its split was timed at on this machine: seconds per computed
    token (padding included, every per-step cost spread over the tokens of the timed steps),
    times the run's tokens with that split's padding, and what its first step takes beyond the
    others (kernels and caches built). Its utilisation is the useful share: `peak_s_per_token`
    is what a real token's useful FLOPs take at the peak."""
    seconds = rate.seconds_per_computed_token * modelled.tokens * padding + rate.first_step_extra_s
    return modelled._replace(
        seconds=seconds, utilisation=peak_s_per_token * modelled.tokens / seconds if seconds else 0.0
    )


def _measured_basis(training: _TrainingTime, rate: SplitRate, padding: float) -> str:
    """The measured estimate's arithmetic in words."""
    return (
        f"{int(training.tokens):,} training tokens"
        + (f" x {padding:.2f} for padding" if padding > 1.0005 else "")
        + f" at {rate.seconds_per_computed_token * 1000:.3g} s per 1,000 computed tokens, measured on this machine "
        f"({rate.label}: {rate.steps} optimizer steps timed, {rate.real_tokens_per_s:,.0f} real tokens/s, "
        f"the first step {rate.first_step_extra_s:.2f} s longer; "
        f"useful FLOPs {training.utilisation:.0%} of the matmul peak)"
    )


def _gathered_bytes(arch: Architecture, w: Workload) -> tuple[float, float]:
    """What FSDP moves per micro-step, in all: the parameters (gathered twice) and the trained
    gradients (reduce-scattered once)."""
    trained = trained_parameters(arch, w.mode, w.tower_trained)
    return arch.params * w.dtype_bytes, trained * (w.dtype_bytes if w.mode == "full" else 4)


def _network_s(arch: Architecture, w: Workload, flavor: Flavor, steps: int, optimizer_steps: int) -> float:
    """Traffic between nodes: FSDP's per micro-step; data parallel's all-reduce of the gradients
    (sent and received) per optimizer step."""
    if w.nodes <= 1:
        return 0.0
    params, grads = _gathered_bytes(arch, w)
    node_bytes_s = flavor.network_gbps / 8 * 1e9 * max(w.processes // w.nodes, 1) * NETWORK_EFFICIENCY
    share = (w.nodes - 1) / w.nodes
    if w.strategy == "fsdp":
        return steps * (2 * params + grads) * share / node_bytes_s
    return optimizer_steps * 2 * grads * share / node_bytes_s


def _offload_s_per_micro_step(arch: Architecture, w: Workload) -> float:
    if not w.offload:
        return 0.0
    params, grads = _gathered_bytes(arch, w)
    return (2 * params + grads) / w.processes / (PCIE_GB_S * 1e9)


def _host_adam_s(arch: Architecture, w: Workload, flavor: Flavor) -> float:
    """One optimizer step on a node's host: its processes' shares of the trained parameters."""
    if not w.offload:
        return 0.0
    per_node = trained_parameters(arch, w.mode, w.tower_trained) / w.nodes
    rate = min(flavor.vcpus / 2 * CPU_ADAM_PARAMS_PER_CORE_S, HOST_MEMORY_GB_S * 1e9 / ADAM_HOST_BYTES)
    return per_node / rate


def _evaluation_s(arch: Architecture, flavor: Flavor, utilisation: float, evaluation: tuple[int, int]) -> float:
    """The before/after evaluation on one GPU: scoring at the training's utilisation,
    generating token by token at HF generation's."""
    scored, generated = evaluation
    peak = flavor.peak_tflops * 1e12
    return scored * 2 * arch.matmul_params / (peak * utilisation) + generated * 2 * arch.matmul_params / (
        peak * GENERATION_UTILISATION["hf"]
    )


def _startup_s(arch: Architecture, backend: str) -> float:
    """Start-up: here the interpreter and imports; a job also waits for its container, downloads
    the checkpoint (16-bit on the Hub, whatever it trains in) and writes one back."""
    if runs_on_this_machine(backend):
        return LOCAL_STARTUP_S
    return CLOUD_STARTUP_S + 2 * arch.params * CHECKPOINT_BYTES_PER_PARAM / DOWNLOAD_BYTES_PER_S


def _modelled_basis(
    arch: Architecture,
    w: Workload,
    flavor: Flavor,
    training: _TrainingTime,
    padding: float,
    steps: int,
    correction: Correction | None,
) -> str:
    """The time model's arithmetic in words, so a reader can check every factor of it."""
    scaling = training.scaling
    return (
        f"{int(training.tokens):,} training tokens"
        + (f" x {padding:.2f} for padding" if padding > 1.0005 else "")
        + f" x {flops_per_token(arch, w):.3g} FLOPs/token = {training.flops:.3g} FLOPs"
        + (
            f", plus {int(training.generated):,} generated tokens ({training.generation_s / 60:.1f} min)"
            if w.generates
            else ""
        )
        + f"; {flavor.name} peak {flavor.peak_tflops:.3g} TFLOP/s"
        + (
            f" x {w.processes} GPUs x {scaling:.0%} scaling efficiency ({w.strategy})"
            if w.processes > 1 and flavor.is_gpu
            else f" x {w.nodes} nodes x {scaling:.0%} efficiency ({w.strategy})"
            if w.nodes > 1
            else f" shared by {w.processes} processes x {scaling:.0%} efficiency ({w.strategy})"
            if w.processes > 1
            else ""
        )
        + f" at {training.utilisation:.0%} utilisation"
        + f"; {steps:,} steps x {STEP_OVERHEAD_S['gpu' if flavor.is_gpu else 'cpu']} s overhead"
        + (f"; x{correction.time_factor:.2f} as measured on {correction.runs} earlier run(s)" if correction else "")
    )


def _basis(
    w: Workload,
    flavor: Flavor,
    training: _TrainingTime,
    evaluation: tuple[int, int],
    evaluation_s: float,
    startup_s: float,
) -> str:
    """The rest of the estimate in words: evaluation, distribution, start-up, range and price."""
    scored, generated = evaluation
    price = flavor.price_per_hour
    return (
        (
            f"; evaluation before and after (held-out rows and tasks): {scored:,} tokens scored, {generated:,} generated ({evaluation_s:.0f} s)"
            if scored or generated
            else ""
        )
        + _distributed_basis(w, flavor, training)
        + f"; start-up {startup_s:.0f} s; range x{RANGE_LOW}-x{RANGE_HIGH}; {usd(price * w.nodes)}/h"
        + (f" for {w.nodes} nodes ({usd(price)} each)" if w.nodes > 1 else "")
        + (
            f" for all {flavor.count * w.nodes} GPUs ({usd(price / flavor.count)} per GPU)"
            if flavor.is_gpu and flavor.count > 1
            else ""
        )
    )


def _distributed_basis(w: Workload, flavor: Flavor, training: _TrainingTime) -> str:
    """The terms several nodes and offloading add, with their assumptions."""
    parts = []
    if w.nodes > 1:
        traffic = "FSDP's gathers and reduce-scatters" if w.strategy == "fsdp" else "the gradients' all-reduce"
        card = "per GPU" if flavor.is_gpu else "per node"
        parts.append(
            f"; {w.nodes} nodes of {flavor.name}: {traffic} {'cross' if w.strategy == 'fsdp' else 'crosses'} a "
            f"{flavor.network_gbps:g} Gb/s network card "
            f"{card} at {NETWORK_EFFICIENCY:.0%}, overlapped with compute"
            + (f", {training.network_s / 60:.1f} min not hidden" if training.network_s else ", hidden behind it")
        )
    if w.offload:
        parts.append(
            f"; CPU offload: shards over PCIe at {PCIE_GB_S:g} GB/s and AdamW on the host "
            f"({CPU_ADAM_PARAMS_PER_CORE_S / 1e6:.0f} M parameters/s per core, at most {HOST_MEMORY_GB_S:g} GB/s of memory): "
            f"{training.offload_s / 60:.1f} min"
        )
    return "".join(parts)


def estimate_run(
    spec: Any,
    arch: Architecture,
    w: Workload,
    flavor: Flavor,
    report: DatasetReport,
    args: dict[str, Any],
    padding: float,
    measured: SplitRate | None = None,
) -> CostEstimate:
    """The estimate for one placement, with the run's tokens, micro-steps and evaluation work
    read from its training arguments (the batch split in them), at the split's measured rate
    where it was timed on this machine."""
    return estimate_for(
        arch,
        w,
        training_tokens(report, args, w.processes),
        flavor,
        spec.backend,
        training_steps(report, args, w.processes),
        padding,
        int(args.get("gradient_accumulation_steps", 1)),
        evaluation_work(spec.method, report, args, spec.evaluation.generations, 3 if spec.evaluation.baseline else 2),
        measured,
        attended_length(report, cut_length(args, report.max_length)),
    )


def planned_batch(plan: Any) -> dict[str, Any]:
    """The training arguments the hardware stage decided from its memory model."""
    return {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_checkpointing": plan.gradient_checkpointing,
    }


def estimate_cost(spec: Any, config: Any, plan: Any, report: DatasetReport, args: dict[str, Any]) -> CostEstimate:
    """The estimate for the placement the hardware stage chose."""
    flavor = (
        local_flavor(spec.flavors)
        if runs_on_this_machine(spec.backend)
        else load_catalogue(spec.flavors).get(plan.flavor)
    )
    arch = Architecture.from_config(config, spec.lora.r, spec.lora.target_modules)
    args = {**args, **planned_batch(plan)}
    placement = Placement(plan.strategy, plan.processes, plan.nodes, plan.offload)
    w = workload_for(spec, flavor, plan.mode, args, report, placement, plan.speed.batching)
    cost = estimate_run(spec, arch, w, flavor, report, args, plan.padding_overhead, plan.measured_split)
    if report.token_counts == "estimated":
        cost = cost.model_copy(
            update={"basis": "TOKENS ESTIMATED (the tokenizer cannot encode; see the dataset warnings); " + cost.basis}
        )
    return cost


def planned_arguments(args: dict[str, Any], plan: HardwarePlan) -> dict[str, Any]:
    """What the script trains with: the method defaults and the spec, then the hardware stage's
    calls (the split of the global batch, checkpointing, the fast path). The plan already kept
    every key the spec set, so the spec still wins."""
    parallel = {}
    if plan.processes > 1 and plan.strategy == "ddp" and "ddp_find_unused_parameters" not in args:
        # every trained parameter gets a gradient in every step: DDP need not search the graph for unused ones
        parallel["ddp_find_unused_parameters"] = False
    return {**args, **planned_batch(plan), **plan.speed.arguments, **parallel}


def repriced(cost: CostEstimate, price_per_hour: float | None) -> CostEstimate:
    """The estimate at the price the backend quotes now (the catalogue's when it does not answer)."""
    if price_per_hour is None or abs(price_per_hour - cost.price_per_hour_usd) < 1e-9:
        return cost
    return cost.model_copy(
        update={
            "price_per_hour_usd": price_per_hour,
            "usd": cost.hours * price_per_hour,
            "usd_low": cost.hours_low * price_per_hour,
            "usd_high": cost.hours_high * price_per_hour,
            "basis": cost.basis + f"; price refreshed to {usd(price_per_hour)}/h",
        }
    )
