"""Size the run and choose where it runs.

The rule, for `hardware: auto`:
1. Candidates: this machine for `backend: local`; for cloud backends every flavor of the
   catalogue with up to MAX_PROCESSES GPUs (one machine), and the CPU flavors.
2. Placements per flavor: one process on a single GPU or a CPU; on N GPUs, N processes that
   accelerate launches, either data parallel (ddp: each GPU holds the whole model state) or
   sharded (fsdp full shard: parameters, gradients and optimizer state divided by N, plus the
   all-gather working set). Where the backend launches across machines (MULTI_NODE_BACKENDS: a
   Kubeflow Trainer TrainJob), also fsdp over 2 to 16 nodes of the flavor. Every sharded
   placement also with FSDP's CPU offload (the shards, their gradients and optimizer state in host
   memory, the optimizer step on the host): it needs host memory and costs time, and wins only
   when it is the fit or the cheapest. `distributed:` in the spec may fix the strategy, the
   nodes, the offload, or run several processes on a CPU.
3. Mode: `lora: false` trains everything, `lora: true` an adapter, `lora: qlora` an adapter
   on 4-bit weights. `lora: auto` trains everything when the model has at most
   LORA_AUTO_THRESHOLD parameters and some candidate fits it; otherwise LoRA; otherwise
   QLoRA (GPUs only: bitsandbytes needs CUDA; data parallel only).
4. A placement fits when the estimated peak memory per GPU (per machine on a CPU) is at most
   SAFETY_MARGIN of its memory, an offloaded one's host memory per node too, and the high end
   of its time estimate is within `budget.max_hours`.
5. Among those that fit, the cheapest run wins (estimated hours x the flavor's hourly price x
   its nodes, which pays for all their GPUs), then the fastest. When nothing fits, the error says
   what would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tasks.core.errors import UserFacingError
from tasks.core.methods import cut_length, method_definition
from tasks.core.models import (
    CostEstimate,
    DatasetReport,
    FlavorOption,
    HardwarePlan,
    SpeedPlan,
    SplitProbe,
    SplitRate,
)
from tasks.core.money import usd
from tasks.core.spec import RunSpec, SpecError, runs_on_this_machine
from tasks.plan.calibration import load_table
from tasks.plan.cost import SCALING_EFFICIENCY, estimate_run, planned_batch
from tasks.plan.flavors import Catalogue, Flavor, load_catalogue, local_flavor
from tasks.plan.memory import (
    ONE_PROCESS,
    Architecture,
    Mode,
    Placement,
    Strategy,
    host_memory_gb,
    memory_breakdown_gb,
    trained_parameters,
    workload_for,
)
from tasks.plan.speed import choose_speed, padding_free_speed, padding_overhead

GB = 1024**3
MAX_PROCESSES = 8  # GPUs of one machine
# Backends that launch one training across machines (a Kubeflow Trainer TrainJob runs torchrun on
# each node), and the node counts the planner weighs for them
MULTI_NODE_BACKENDS = ("kubernetes",)
NODE_COUNTS = (1, 2, 4, 8, 16)
LORA_AUTO_THRESHOLD = 3_000_000_000
SAFETY_MARGIN = 0.9


class HardwareError(UserFacingError, ValueError):
    """No placement fits; the message says what would."""


def _global_batch(spec: RunSpec, args: dict[str, Any], processes: int = 1) -> tuple[int, list[int]]:
    """The rows each process contributes to an optimizer step (the spec's global batch, divided
    among the processes), and the micro-batches the planner may split it into, largest first: all
    its divisors, unless the spec fixed the split by setting gradient_accumulation_steps itself
    (then every process takes that split and the global batch grows with the process count)."""
    micro = int(args.get("per_device_train_batch_size", 1))
    total = micro * int(args.get("gradient_accumulation_steps", 1))
    least = method_definition(spec.method).min_micro_batch
    if micro < least:
        raise SpecError(
            f"training.per_device_train_batch_size is {micro}, and {spec.method} needs at least {least} rows per "
            f"micro-batch ({method_definition(spec.method).trainer} estimates a term from the other rows of it); "
            f"raise it to {least} or more"
        )
    if "gradient_accumulation_steps" in spec.training:
        return total, [micro]
    share = max(1, math.ceil(total / processes))
    if share < least:
        raise SpecError(
            f"the global batch of {total} rows gives each of {processes} processes {share}, and {spec.method} needs "
            f"at least {least} per micro-batch; raise training.per_device_train_batch_size"
        )
    return share, [m for m in range(share, 0, -1) if share % m == 0 and m >= least]


# (micro-batch, recompute[, the split's rate timed here]) -> the placement
Attempt = Callable[..., tuple[FlavorOption, CostEstimate]]
Tried = list[tuple[int, bool, FlavorOption, CostEstimate]]  # (micro-batch, recompute, placement, cost), in order


def _option(
    spec: RunSpec,
    flavor: Flavor,
    mode: Mode,
    arch: Architecture,
    args: dict[str, Any],
    report: DatasetReport,
    placement: Placement = ONE_PROCESS,
    probe: SplitProbe | None = None,
) -> tuple[FlavorOption, CostEstimate]:
    """One placement, with the largest micro-batch that fits with margin, and gradient
    checkpointing only when not even a micro-batch of 1 fits without it: recomputing activations
    costs a third more compute (on an H200 with Qwen2.5-0.5B, TRL's default of always recomputing
    and a micro-batch of 8 made steps 2.7x slower; benchmarks/results)."""
    processes = placement.processes
    total, micros = _global_batch(spec, args, processes)
    speed = _speed(spec, flavor, arch, args, report, total, processes)

    def attempt(micro: int, on: bool, rate: SplitRate | None = None) -> tuple[FlavorOption, CostEstimate]:
        split = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": total // micro}
        placed = {**args, **split, "gradient_checkpointing": on}
        batched = padding_free_speed(speed) if rate and rate.padding_free else speed
        return _option_with(spec, flavor, mode, arch, placed, report, batched, placement, rate)

    fastest = ""
    if not flavor.is_gpu and method_definition(spec.method).cpu_split_search and len(micros) > 1:
        timed = probe is not None and placement == ONE_PROCESS and probe.rates
        tried, fastest = _measured_split(probe, attempt) if timed else _fastest_cpu_split(micros, attempt)
    else:
        tried = _largest_fitting_split(micros, _recompute_options(spec, flavor), attempt)
    micro, on, option, cost = tried[-1]
    return option.model_copy(
        update={
            "gradient_checkpointing": on,
            "checkpointing_reason": _checkpointing_reason(spec, flavor, tried),
            "micro_batch": micro,
            "accumulation": total // micro,
            "batch_reason": _batch_reason(spec, option, micro, total, len(micros), processes, fastest),
        }
    ), cost


def _speed(
    spec: RunSpec,
    flavor: Flavor,
    arch: Architecture,
    args: dict[str, Any],
    report: DatasetReport,
    total: int,
    processes: int,
) -> SpeedPlan:
    """The speed choices for this placement. Batching depends on whether the run ends at an
    epoch's end: a max_steps that stops within the first epoch does not."""
    max_steps = int(args.get("max_steps", -1) or -1)
    return choose_speed(
        spec.method,
        spec.training,
        flavor,
        arch.model_type,
        runs_on_this_machine(spec.backend),
        report.rows_over_max_length,
        every_row_measured=report.token_rows_measured >= report.rows,
        whole_epochs=max_steps <= 0 or max_steps * total * processes >= report.train_rows,
    )


def _recompute_options(spec: RunSpec, flavor: Flavor) -> list[bool]:
    """Gradient checkpointing settings to try, in order: the spec's, else off before on (on a
    CPU memory is plentiful, so only off)."""
    if "gradient_checkpointing" in spec.training:
        return [bool(spec.training["gradient_checkpointing"])]
    return [False, True] if flavor.is_gpu else [False]


def _largest_fitting_split(micros: list[int], recompute: list[bool], attempt: Attempt) -> Tried:
    """Every split tried, largest micro-batch first and without recomputing first, up to the first
    that fits (the last one tried when none does): a bigger micro-batch uses a GPU better."""
    tried: Tried = []
    for on in recompute:
        for micro in micros:
            option, cost = attempt(micro, on)
            tried.append((micro, on, option, cost))
            if option.peak_memory_gb <= option.usable_memory_gb:
                return tried
    return tried


def _fastest_cpu_split(micros: list[int], attempt: Attempt) -> tuple[Tried, str]:
    """On a CPU a bigger micro-batch buys no parallelism, only padding: the split the time model
    (padding simulated on the measured lengths, a fixed cost per forward pass) says is fastest,
    with why. Measured on 2 cores, realistic chat rows: micro-batch 1 ran 2.9-3.2x TRL's
    defaults, 2 2.7x, 4 1.8x (benchmarks/results/throughput-tiny-full-cpu.md)."""
    timed = [(m, *attempt(m, False)) for m in micros]
    fitting = [t for t in timed if t[1].peak_memory_gb <= t[1].usable_memory_gb] or timed
    best = min(fitting, key=lambda t: (t[2].hours, -t[0]))
    others = ", ".join(f"{m}: {c.compute_s:.0f} s" for m, _, c in sorted(timed, key=lambda t: t[0])[:6])
    fastest = f"the fastest split on a CPU by the time model (training time by micro-batch: {others})"
    return [(best[0], False, best[1], best[2])], fastest


def _measured_split(probe: SplitProbe, attempt: Attempt) -> tuple[Tried, str]:
    """The split that trained fastest on this machine: each timed split's seconds per computed
    token, times the run's tokens with the padding that split leaves (simulated on the lengths)."""
    timed = [(rate, *attempt(rate.micro_batch, False, rate)) for rate in probe.rates]
    fitting = [t for t in timed if t[1].peak_memory_gb <= t[1].usable_memory_gb] or timed
    rate, option, cost = min(fitting, key=lambda t: t[2].compute_s)
    measured = "; ".join(
        f"{r.label}: {r.real_tokens_per_s:,.0f} real tokens/s, {c.compute_s:.0f} s" for r, _, c in timed
    )
    fastest = f"the fastest split timed on this machine ({measured}; {probe.seconds:.0f} s probe)"
    return [(rate.micro_batch, False, option, cost)], fastest


def _memory_use(option: FlavorOption) -> str:
    """How much of the usable memory the placement needs, as the reasons quote it."""
    return f"{option.peak_memory_gb:.1f} of {option.usable_memory_gb:.1f} GB usable"


def _batch_reason(
    spec: RunSpec, option: FlavorOption, micro: int, total: int, splits: int, processes: int, fastest: str
) -> str:
    """Why the global batch is split this way: the spec's split, the fastest on a CPU, or the
    largest micro-batch that fits (`splits`: how many splits were open to the planner)."""
    if "gradient_accumulation_steps" in spec.training:
        reason = f"set in the spec: micro-batch {micro} x {total // micro} accumulation steps"
        if processes > 1:
            reason += f" in each of {processes} processes = global batch {total * processes}"
    elif fastest:
        reason = f"micro-batch {micro} x {total // micro} accumulation steps = global batch {total}: {fastest}"
    elif micro == total:
        reason = f"the whole global batch of {total} in one micro-batch fits ({_memory_use(option)})"
    elif option.peak_memory_gb <= option.usable_memory_gb:
        reason = (
            f"micro-batch {micro} x {total // micro} accumulation steps = global batch {total}: "
            f"the largest micro-batch that fits ({_memory_use(option)})"
        )
    else:
        reason = f"micro-batch {micro}: even the smallest split of the global batch {total} does not fit"
    if processes > 1 and splits > 1:
        reason = f"{reason}; in each of {processes} processes = global batch {total * processes}"
    return reason


def _checkpointing_reason(spec: RunSpec, flavor: Flavor, tried: Tried) -> str:
    """Why gradient checkpointing is on or off for the split chosen (the last one tried)."""
    micro, on, option, _ = tried[-1]
    if "gradient_checkpointing" in spec.training:
        return f"{'on' if on else 'off'}: set in the spec"
    if not flavor.is_gpu:
        return "off: on a CPU memory is plentiful and recomputing only slows"
    if not on:
        return f"off: the run fits without it at micro-batch {micro} ({_memory_use(option)})"
    smallest, without = [(m, o) for m, c, o, _ in tried if not c][-1]
    return (
        f"on: without it even micro-batch {smallest} needs {without.peak_memory_gb:.1f} GB "
        f"of {option.usable_memory_gb:.1f} GB usable"
    )


def _option_with(
    spec: RunSpec,
    flavor: Flavor,
    mode: Mode,
    arch: Architecture,
    args: dict[str, Any],
    report: DatasetReport,
    speed: SpeedPlan,
    placement: Placement = ONE_PROCESS,
    measured: SplitRate | None = None,
) -> tuple[FlavorOption, CostEstimate]:
    w = workload_for(spec, flavor, mode, args, report, placement, speed.batching)
    memory, memory_factor = _calibrated_memory(arch, w, flavor, mode)
    peak = sum(memory.values())
    usable = flavor.memory_gb * SAFETY_MARGIN
    host = sum(host_memory_gb(arch, w).values())
    usable_host = flavor.ram_gb * SAFETY_MARGIN
    micro = int(args.get("per_device_train_batch_size", 1))
    overhead = padding_overhead(
        report.length_percentiles,
        report.train_rows,
        cut_length(args, report.max_length),
        micro,
        micro * int(args.get("gradient_accumulation_steps", 1)),
        speed.batching,
    )
    cost = estimate_run(spec, arch, w, flavor, report, args, overhead, measured)
    problems = []
    if peak > usable:
        problems.append(f"needs {peak:.1f} GB, has {usable:.1f} GB usable")
    if host > usable_host:
        problems.append(f"offloading needs {host:.0f} GB of host memory per node, has {usable_host:.0f} GB usable")
    if mode == "qlora" and not flavor.is_gpu:
        problems.append("QLoRA needs a CUDA GPU")
    if cost.hours_high > spec.budget.max_hours:
        problems.append(f"up to {cost.hours_high:.1f} h, over budget.max_hours {spec.budget.max_hours:g}")
    return (
        FlavorOption(
            flavor=flavor.name,
            mode=mode,
            peak_memory_gb=round(peak, 3),
            usable_memory_gb=round(usable, 2),
            hours=cost.hours,
            usd=cost.usd,
            fits=not problems,
            why_not="; ".join(problems),
            memory_breakdown_gb=memory,
            speed=speed,
            padding_overhead=round(overhead, 3),
            memory_factor=memory_factor,
            strategy=w.strategy,
            processes=placement.processes,
            nodes=placement.nodes,
            offload=placement.offload,
            host_memory_gb=round(host, 2),
            usable_host_memory_gb=round(usable_host, 2),
        ),
        cost,
    )


def _calibrated_memory(arch: Architecture, w: Any, flavor: Flavor, mode: Mode) -> tuple[dict[str, float], float]:
    """The memory model's breakdown per GPU (or machine), with what earlier runs like this one
    measured beyond (or below) it, and that factor."""
    memory = memory_breakdown_gb(arch, w, "gpu" if flavor.is_gpu else "cpu", flavor.memory_gb)
    correction = load_table().find(flavor.name, arch.model_type, mode)
    factor = correction.memory_factor if correction else 1.0
    if factor != 1.0:
        memory["calibration"] = round(sum(memory.values()) * (factor - 1), 4)
    return memory, factor


def _candidates(spec: RunSpec, catalogue: Catalogue) -> list[Flavor]:
    if runs_on_this_machine(spec.backend):
        if spec.hardware not in ("auto", "local"):
            raise HardwareError(
                f"hardware '{spec.hardware}' names a cloud flavor, but backend: local runs on this machine; "
                "set hardware: auto (or use backend: hf-jobs for that flavor)"
            )
        return [local_flavor(spec.flavors)]
    if spec.hardware != "auto":
        flavor = catalogue.get(spec.hardware)
        if flavor.count > MAX_PROCESSES:
            raise HardwareError(
                f"hardware '{flavor.name}' has {flavor.count} GPUs; one run uses at most {MAX_PROCESSES} (one machine: "
                "training across machines is not supported). Choose a flavor with fewer GPUs."
            )
        return [flavor]
    return [f for f in catalogue.flavors.values() if f.count <= MAX_PROCESSES]


def _placements(spec: RunSpec, flavor: Flavor, mode: Mode) -> list[Placement]:
    """How a flavor may run the training: on one node as one machine allows, and, where the
    backend trains across machines, sharded over several nodes of it; each sharded placement
    also with FSDP's CPU offload, unless the spec rules one out."""
    one_node = _one_node_placements(spec, flavor, mode)
    if not one_node:
        return []  # not the GPU count distributed.processes asks for
    nodes, strategy = _node_counts(spec), spec.distributed.strategy
    per_node, several = one_node[0].processes, [n for n in nodes if n > 1]
    placements = [p for p in one_node if 1 in nodes]
    shards = flavor.is_gpu and mode != "qlora"  # 4-bit weights do not shard here; FSDP needs GPUs
    if shards and strategy in ("auto", "fsdp"):
        placements += [Placement("fsdp", per_node * n, n) for n in several]
    if spec.distributed.nodes and strategy in ("auto", "ddp") and not (strategy == "auto" and shards):
        # data parallel across machines only when asked for: it is never cheaper than one of them
        placements += [Placement("ddp", per_node * n, n) for n in several]
    offloaded = [p._replace(offload=True) for p in placements if p.strategy == "fsdp"]
    return {"auto": placements + offloaded, "on": offloaded, "off": placements}[spec.distributed.offload]


def _node_counts(spec: RunSpec) -> tuple[int, ...]:
    """Machines a run may span: the spec's count, else one, or up to MAX_NODES where the backend
    can launch across machines."""
    if spec.distributed.nodes is not None:
        if spec.distributed.nodes > 1 and spec.backend not in MULTI_NODE_BACKENDS:
            raise HardwareError(
                f"distributed.nodes is {spec.distributed.nodes}, and backend: {spec.backend} trains on one machine; "
                "backend: kubernetes trains across machines (a Kubeflow Trainer TrainJob), or remove distributed.nodes"
            )
        return (spec.distributed.nodes,)
    return NODE_COUNTS if spec.backend in MULTI_NODE_BACKENDS else (1,)


def _one_node_placements(spec: RunSpec, flavor: Flavor, mode: Mode) -> list[Placement]:
    """One machine: a GPU flavor runs one process per GPU (fewer would pay for idle GPUs), a CPU
    runs one unless the spec asks for more."""
    wanted = spec.distributed
    if flavor.is_gpu:
        if wanted.processes is not None and wanted.processes != flavor.count:
            if spec.hardware == "auto":
                return []  # another flavor has that many GPUs
            raise HardwareError(
                f"distributed.processes is {wanted.processes}, but {flavor.name} has {flavor.count} GPU"
                f"{'s' if flavor.count > 1 else ''}: a run uses one process per GPU. Remove distributed.processes "
                "or choose a flavor with that many GPUs (hardware: ...)."
            )
        processes = flavor.count
    else:
        processes = wanted.processes or 1
    if processes == 1:
        return [Placement()]
    strategies: list[Strategy] = ["ddp", "fsdp"] if wanted.strategy == "auto" else [wanted.strategy]
    if not flavor.is_gpu:
        if wanted.strategy == "fsdp":
            if spec.hardware == "auto" and not runs_on_this_machine(spec.backend):
                return []  # the GPU flavors can
            # accelerate 1.15 switches to FSDP only for GPU-like devices: on a CPU it trains as DDP
            # without saying so (or stops, with cpu_ram_efficient_loading), so it is not offered
            raise HardwareError(
                f"distributed.strategy: fsdp needs GPUs; {flavor.name} is a CPU, where accelerate 1.15 would silently "
                "train data parallel instead (it switches to FSDP only for accelerator types: AcceleratorState in "
                "accelerate/state.py). Use strategy ddp (or auto) here, or a GPU flavor."
            )
        strategies = ["ddp"]
    if mode == "qlora":  # 4-bit weights do not shard with FSDP here; each GPU holds the whole 4-bit model
        strategies = [s for s in strategies if s == "ddp"]
    return [Placement(s, processes) for s in strategies]


# Cloud CPU flavors are offered only to models this small: above it, CPU training speed is far
# outside what the calibration (up to 100M parameters) covers, and no one trains that way.
CPU_FLAVOR_MAX_PARAMS = 1_000_000_000


def _fit_for_device(flavors: list[Flavor], arch: Architecture, spec: RunSpec) -> list[Flavor]:
    if spec.hardware != "auto" or arch.params <= CPU_FLAVOR_MAX_PARAMS:
        return flavors
    return [f for f in flavors if f.is_gpu]


def _modes(spec: RunSpec, arch: Architecture) -> list[tuple[Mode, str]]:
    setting = spec.lora.enabled
    if setting is False:
        return [("full", "lora: false in the spec")]
    if setting is True:
        return [("lora", "lora: true in the spec")]
    if setting == "qlora":
        return [("qlora", "lora: qlora in the spec")]
    if arch.params > LORA_AUTO_THRESHOLD:
        big = f"auto: {arch.params / 1e9:.1f}B parameters is above the {LORA_AUTO_THRESHOLD / 1e9:.0f}B threshold"
        return [("lora", big), ("qlora", big + ", and LoRA in 16 bits fits nowhere")]
    return [
        ("full", "auto: full fine-tuning fits"),
        ("lora", "auto: full fine-tuning fits nowhere"),
        ("qlora", "auto: neither full fine-tuning nor LoRA in 16 bits fits anywhere"),
    ]


def _flavor_option(
    spec: RunSpec,
    flavor: Flavor,
    mode: Mode,
    arch: Architecture,
    args: dict[str, Any],
    report: DatasetReport,
    probe: SplitProbe | None = None,
) -> tuple[FlavorOption, CostEstimate] | None:
    """The flavor's best placement: the cheapest that fits, else the one needing least memory
    (to say how far it is), with why this strategy; None when the flavor cannot run it at all."""
    tried = [_option(spec, flavor, mode, arch, args, report, p, probe) for p in _placements(spec, flavor, mode)]
    if not tried:
        return None
    fitting = [t for t in tried if t[0].fits]
    option, cost = (
        min(fitting, key=lambda t: (t[0].usd, t[0].hours)) if fitting else min(tried, key=lambda t: t[0].peak_memory_gb)
    )
    reason = _strategy_reason(spec, flavor, option, [o for o, _ in tried])
    return option.model_copy(update={"strategy_reason": reason}), cost


def _strategy_reason(spec: RunSpec, flavor: Flavor, chosen: FlavorOption, tried: list[FlavorOption]) -> str:
    if chosen.processes == 1:
        return "one process " + ("on one GPU" if flavor.is_gpu else "on the CPU")
    scaling = SCALING_EFFICIENCY["gpu" if flavor.is_gpu else "cpu"][chosen.strategy]
    if chosen.nodes > 1:
        each = "GPUs in all, one process each" if flavor.is_gpu else "processes in all, one per node's CPU"
        where = (
            f"{chosen.nodes} nodes of {flavor.name}, {chosen.processes} {each} "
            f"({scaling:.0%} scaling efficiency assumed, plus the network between nodes)"
        )
    elif flavor.is_gpu:
        where = f"{chosen.processes} GPUs, one process each ({scaling:.0%} scaling efficiency assumed)"
    else:
        where = (
            f"{chosen.processes} processes on the CPU over gloo, as distributed.processes asks: they share its cores, "
            f"so this is no faster than one process ({scaling:.0%} efficiency assumed); it runs the multi-GPU path "
            "without a GPU"
        )
    name = {"ddp": "ddp (data parallel)", "fsdp": "fsdp (full shard)"}[chosen.strategy]
    memory = f"{chosen.peak_memory_gb:.1f} of {chosen.usable_memory_gb:.1f} GB usable per {'GPU' if flavor.is_gpu else 'machine'}"
    if chosen.offload:
        name += " with CPU offload"
        memory += (
            f"; {chosen.host_memory_gb:.0f} of {chosen.usable_host_memory_gb:.0f} GB host memory per node holds the "
            "parameter shards, gradients and optimizer state"
        )
    if spec.distributed.strategy != "auto" and not (chosen.nodes > 1 or chosen.offload):
        return f"{name} on {where}: set in the spec ({memory})"
    if not flavor.is_gpu:
        return f"{name} on {where} ({memory})"
    if chosen.strategy == "ddp":
        return f"{name} on {where}: each process holds the whole model state ({memory}); the fastest way to use them"
    why = _why_sharded(chosen, tried)
    return f"{name} on {where}: {why}; sharded, {memory}" if why else f"{name} on {where} ({memory})"


def _why_sharded(chosen: FlavorOption, tried: list[FlavorOption]) -> str:
    """What the cheaper or faster placements of the same flavor lacked."""
    reasons = []
    ddp = next((o for o in tried if o.strategy == "ddp"), None)
    if ddp is not None:
        reasons.append(
            f"data parallel needs {ddp.peak_memory_gb:.1f} GB per GPU ({ddp.why_not or 'it fits, but costs more'})"
        )
    fewer = [o for o in tried if o.strategy == "fsdp" and (o.nodes, o.offload) < (chosen.nodes, chosen.offload)]
    for o in sorted(fewer, key=lambda o: (o.nodes, o.offload)):
        label = f"{o.nodes} node{'s' if o.nodes > 1 else ''}" + (" with offload" if o.offload else "")
        verdict = o.why_not or f"fits, at {usd(o.usd)} against {usd(chosen.usd)}"
        reasons.append(f"sharded on {label}: {verdict}")
    same = next((o for o in tried if o.offload and o.nodes == chosen.nodes), None)
    if not chosen.offload and same is not None:
        verdict = same.why_not or f"{usd(same.usd)} ({same.hours:.1f} h), more than {usd(chosen.usd)}"
        reasons.append(f"with CPU offload: {verdict}")
    return "; ".join(reasons)


def select_hardware(
    spec: RunSpec,
    config: Any,
    args: dict[str, Any],
    report: DatasetReport,
    catalogue: Catalogue | None = None,
    probe: SplitProbe | None = None,
) -> tuple[HardwarePlan, CostEstimate]:
    """The cheapest placement that fits; on this machine's CPU the batch split the probe timed
    fastest, when it ran (tasks/plan/probe.py), else the time model's."""
    catalogue = catalogue or load_catalogue(spec.flavors)
    arch = Architecture.from_config(config, spec.lora.r, spec.lora.target_modules)
    candidates = _candidates(spec, catalogue)
    if not runs_on_this_machine(spec.backend):
        candidates = _fit_for_device(candidates, arch, spec)
    considered: list[FlavorOption] = []
    for mode, reason in _modes(spec, arch):
        options = [o for f in candidates if (o := _flavor_option(spec, f, mode, arch, args, report, probe))]
        considered += [o for o, _ in options]
        fitting = sorted((o for o in options if o[0].fits), key=lambda o: (o[0].usd, o[0].hours))
        if fitting:
            best, cost = fitting[0]
            flavor = next(f for f in candidates if f.name == best.flavor)
            plan = _plan(spec, flavor, best, arch, reason, considered, args, report)
            return plan.model_copy(update={"split_probe": probe}), cost
    if not considered:
        raise HardwareError(
            f"no flavor has {spec.distributed.processes} GPUs (distributed.processes); remove it, or add such a "
            "flavor under `flavors:` in the spec"
        )
    raise HardwareError(_nothing_fits(spec, considered, candidates, arch, args, report))


def _plan(
    spec: RunSpec,
    flavor: Flavor,
    best: FlavorOption,
    arch: Architecture,
    reason: str,
    considered: list[FlavorOption],
    args: dict[str, Any],
    report: DatasetReport,
) -> HardwarePlan:
    placement = Placement(best.strategy, best.processes, best.nodes, best.offload)
    w = workload_for(spec, flavor, best.mode, {**args, **planned_batch(best)}, report, placement, best.speed.batching)
    dtype = "bfloat16" if w.dtype_bytes == 2 else "float32"
    alternatives = sorted((o for o in considered if o.fits and o.mode == best.mode), key=lambda o: o.usd)[:5]
    return HardwarePlan(
        backend=spec.backend,
        flavor=flavor.name,
        description=("this machine: " if runs_on_this_machine(spec.backend) else "")
        + (f"{best.nodes} nodes of " if best.nodes > 1 else "")
        + flavor.describe(),
        accelerator=flavor.accelerator,
        accelerator_count=flavor.count,
        accelerator_memory_gb=round(flavor.memory_gb, 2) if flavor.is_gpu else None,
        cpu_count=flavor.vcpus,
        ram_gb=round(flavor.ram_gb, 2),
        price_per_hour_usd=flavor.price_per_hour * best.nodes,
        peak_tflops=flavor.peak_tflops,
        parameters=arch.params,
        trainable_parameters=trained_parameters(arch, best.mode, w.tower_trained),
        lora_target_modules=list(arch.lora_targets) if isinstance(arch.lora_targets, tuple) else arch.lora_targets,
        expert_parameters=arch.expert_params,
        frozen_tower_parameters=0 if w.tower_trained else arch.tower_params,
        trained_tower_parameters=arch.tower_params if w.tower_trained else 0,
        tower_modules=list(arch.tower_modules),
        dtype=dtype,  # type: ignore[arg-type]
        mode=best.mode,
        use_lora=best.mode != "full",
        lora_reason=reason,
        seq_len=w.seq_len,
        gradient_checkpointing=w.checkpointing,
        checkpointing_reason=best.checkpointing_reason,
        micro_batch=best.micro_batch,
        accumulation=best.accumulation,
        batch_reason=best.batch_reason,
        speed=best.speed,
        padding_overhead=best.padding_overhead,
        model_type=arch.model_type,
        memory_factor=best.memory_factor,
        memory_breakdown_gb=best.memory_breakdown_gb,
        estimated_peak_memory_gb=best.peak_memory_gb,
        available_memory_gb=best.usable_memory_gb,
        fits=True,
        alternatives=alternatives,
        **_placement_fields(best, arch, w, flavor),
        layer_classes=list(arch.layer_classes),
    )


def _placement_fields(best: FlavorOption, arch: Architecture, w: Any, flavor: Flavor) -> dict[str, Any]:
    """How the plan spreads over processes, nodes and host memory."""
    return {
        "strategy": best.strategy,
        "processes": best.processes,
        "nodes": best.nodes,
        "offload": best.offload,
        "host_memory_breakdown_gb": host_memory_gb(arch, w),
        "available_host_memory_gb": round(flavor.ram_gb * SAFETY_MARGIN, 2),
        "strategy_reason": best.strategy_reason,
    }


def _cheapest_fit(
    spec: RunSpec,
    flavors: list[Flavor],
    modes: list[Mode],
    arch: Architecture,
    args: dict[str, Any],
    report: DatasetReport,
) -> FlavorOption | None:
    fits = [
        o for f in flavors for m in modes if (t := _flavor_option(spec, f, m, arch, args, report)) and (o := t[0]).fits
    ]
    return min(fits, key=lambda o: o.usd) if fits else None


def _nothing_fits(
    spec: RunSpec,
    considered: list[FlavorOption],
    candidates: list[Flavor],
    arch: Architecture,
    args: dict[str, Any],
    report: DatasetReport,
) -> str:
    smallest = min(considered, key=lambda o: (o.peak_memory_gb - o.usable_memory_gb, o.peak_memory_gb))
    biggest = max(candidates, key=lambda f: (f.memory_gb * max(f.count, 1), f.memory_gb))
    if runs_on_this_machine(spec.backend):
        where = "nothing on this machine"
    elif spec.hardware == "auto":
        where = f"no flavor of the catalogue (CPU, one GPU, or up to {MAX_PROCESSES} GPUs of one machine, sharded)"
        if spec.backend in MULTI_NODE_BACKENDS:
            where = f"no flavor of the catalogue, on up to {NODE_COUNTS[-1]} nodes"
    else:
        where = f"nothing: not on the chosen flavor '{spec.hardware}'"
    per = "per GPU" if smallest.processes > 1 else ""
    placement = f", {smallest.strategy} over {smallest.processes} processes" if smallest.processes > 1 else ""
    lines = [
        f"the run fits on {where}. The closest is {smallest.mode} on {smallest.flavor}{placement}: "
        f"{smallest.peak_memory_gb:.1f} GB{' ' + per if per else ''} ({smallest.why_not}). What would help:"
    ]
    if sharding := _sharding_need(considered):
        lines.append(sharding)
    if across := _across_machines(spec, arch, args, report):
        lines.append(across)
    modes = [m for m, _ in _modes(spec, arch)]
    seq = cut_length(args, report.max_length)
    for shorter in (seq // 2, seq // 4):
        if shorter < 64:
            break
        best = _cheapest_fit(spec, candidates, modes, arch, {**args, "max_length": shorter}, report)
        if best:
            lines.append(f"- max_length {shorter} (rows longer are truncated) fits on {best.flavor} with {best.mode}")
            break
    if spec.lora.enabled is False:
        adapter = _cheapest_fit(spec, candidates, ["lora", "qlora"], arch, args, report)
        where_adapter = f": fits on {adapter.flavor} ({adapter.mode}), about {usd(adapter.usd)}" if adapter else ""
        lines.append(f"- lora: auto (or true/qlora) trains an adapter and needs far less memory{where_adapter}")
    elif spec.lora.enabled is True and (best := _cheapest_fit(spec, candidates, ["qlora"], arch, args, report)):
        lines.append(f"- lora: qlora (4-bit base weights) fits on {best.flavor}, about {usd(best.usd)}")
    if int(args.get("per_device_train_batch_size", 1)) > 1:
        lines.append("- per_device_train_batch_size 1 with gradient_accumulation_steps to keep the effective batch")
    if runs_on_this_machine(spec.backend):
        lines.append("- backend: hf-jobs, to rent a GPU that fits")
    elif spec.hardware != "auto":
        others = [f for f in load_catalogue(spec.flavors).flavors.values() if f.count <= MAX_PROCESSES]
        if best := _cheapest_fit(spec, others, modes, arch, args, report):
            lines.append(f"- hardware: {best.flavor} ({best.mode}, about {usd(best.usd)}), or hardware: auto")
    else:
        lines.append(f"- nothing bigger is listed: the biggest flavor is {biggest.describe()}")
    return "\n".join(lines)


SHARDED = ("weights", "adapter", "gradients", "optimizer", "optimizer step", "reference model")


def _across_machines(spec: RunSpec, arch: Architecture, args: dict[str, Any], report: DatasetReport) -> str:
    """Where this backend trains on one machine, what training across machines would take."""
    if spec.backend in MULTI_NODE_BACKENDS or spec.distributed.nodes not in (None, 1):
        return ""
    there = spec.model_copy(
        update={"backend": "kubernetes", "hardware": "auto" if runs_on_this_machine(spec.backend) else spec.hardware}
    )
    flavors = [f for f in load_catalogue(spec.flavors).flavors.values() if f.is_gpu and f.count <= MAX_PROCESSES]
    if there.hardware != "auto":
        flavors = [f for f in flavors if f.name == there.hardware]
    best = _cheapest_fit(there, flavors, [m for m, _ in _modes(spec, arch)], arch, args, report)
    if best is None:
        return f"- not even across {NODE_COUNTS[-1]} machines (backend: kubernetes)"
    return (
        f"- backend: kubernetes trains across machines (a Kubeflow Trainer TrainJob): {best.mode}, fsdp over "
        f"{best.nodes} nodes of {best.flavor} ({best.processes} GPUs){' with CPU offload' if best.offload else ''}, "
        f"about {usd(best.usd)}"
    )


def _sharding_need(considered: list[FlavorOption]) -> str:
    """How many GPUs a sharded run would need, from the sharded placement with the most memory
    per GPU: the model state grows no smaller than its share of N GPUs, the rest stays per GPU."""
    sharded = [o for o in considered if o.strategy == "fsdp" and not o.offload]
    if not sharded:
        return ""
    o = max(sharded, key=lambda x: (x.usable_memory_gb, x.processes))
    share = sum(v for k, v in o.memory_breakdown_gb.items() if k in SHARDED)
    state = share * o.processes
    room = o.usable_memory_gb - (o.peak_memory_gb - share)
    if room <= 0:
        return (
            f"- sharded over {o.processes} GPUs ({o.flavor}), what every GPU holds besides its share of the model state "
            f"({o.peak_memory_gb - share:.1f} GB) already exceeds its {o.usable_memory_gb:.1f} GB usable"
        )
    needed = math.ceil(state / room)
    return (
        f"- sharded (fsdp), the model state is {state:.0f} GB: it needs about {needed} GPUs like {o.flavor}'s "
        f"({o.usable_memory_gb:.0f} GB usable each), more than the {o.processes} "
        + ("it has" if o.nodes == 1 else f"of {o.nodes} nodes")
    )
