"""How each training step runs fastest where the run was placed.

Every choice carries its reason and yields to the spec: a TRL key the spec's `training` sets
is kept as given and reported as "set in the spec". The choices (micro-batch and gradient
checkpointing are the memory model's, in tasks/plan/hardware.py):
- batching: rows of similar length share a batch (`train_sampling_strategy: group_by_length`),
  or padding-free batches (`padding_free`) where a varlen attention kernel makes them cheap;
  measured side by side in benchmarks/results/throughput-*.md (`python -m benchmarks.throughput`);
- attention: FlashAttention-2 where it is installed on an Ampere-or-newer GPU, else PyTorch's SDPA;
- precision: bf16 where the GPU has it, fp16 with loss scaling on a T4, float32 on a CPU;
- optimizer: the fused AdamW on GPUs (one kernel for all parameters);
- Liger kernels where liger-kernel is installed, on a GPU, for an architecture it patches;
- data loading: worker processes and pinned memory on GPUs; none on a CPU.
The padding a batching leaves is simulated on the dataset's measured lengths with the
sampler transformers itself uses, so the time estimate follows the choice.
"""

from __future__ import annotations

import importlib.util
from typing import Any, cast

from tasks.core.methods import method_definition
from tasks.core.models import Batching, SpeedChoice, SpeedPlan
from tasks.core.spec import SpecError
from tasks.plan.flavors import Flavor

SIMULATED_ROWS = 20_000  # rows drawn from the measured length distribution to simulate batching
GIVEN = "set in the spec"  # the reason of every choice the spec's `training` makes itself


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def liger_model_types() -> frozenset[str]:
    """Architectures liger-kernel patches, read from the installed package (empty when absent)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return frozenset()
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # installed without triton (a CPU machine): it cannot run here anyway
        return frozenset()
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _spec_sets(training: dict[str, Any], *keys: str) -> bool:
    return any(k in training for k in keys)


def choose_speed(
    method: str,
    training: dict[str, Any],
    flavor: Flavor,
    model_type: str,
    on_this_machine: bool,
    rows_over_max_length: int,
    every_row_measured: bool = True,
    whole_epochs: bool = True,
) -> SpeedPlan:
    """`training` is the spec's own `training` mapping (not the method defaults): what it sets wins.
    `whole_epochs`: the run ends at an epoch's end (no max_steps that stops within the first)."""
    attention, attention_arguments = _attention(training, flavor, on_this_machine)
    batching, batching_arguments = _batching(
        method, training, flavor.is_gpu, attention.value, rows_over_max_length, every_row_measured, whole_epochs
    )
    liger, liger_arguments = _liger(training, flavor.is_gpu, model_type)
    decided = [
        (attention, attention_arguments),
        (batching, batching_arguments),
        _precision(training, flavor),
        _optimizer(training, flavor.is_gpu),
        (liger, liger_arguments),
        _data_loading(training, flavor),
    ]
    arguments = {k: v for _, chosen in decided for k, v in chosen.items()}
    # the spec's keys win; only the max_length that planned padding-free batches must unset stays
    planned_padding_free = batching.value == "padding_free" and "padding_free" not in training
    arguments = {
        k: v for k, v in arguments.items() if k not in training or (k == "max_length" and planned_padding_free)
    }
    chosen = SpeedPlan(
        batching=cast(Batching, batching.value),
        attention=attention.value,
        liger=liger.value == "on",
        choices=[choice for choice, _ in decided],
        arguments=arguments,
    )
    return _attention_by_rows(chosen) if chosen.batching == "padding_free" and not flavor.is_gpu else chosen


def _attention(training: dict[str, Any], flavor: Flavor, on_this_machine: bool) -> tuple[SpeedChoice, dict[str, Any]]:
    """The attention kernel: FlashAttention-2 only where it can run (installed where the script
    runs, an Ampere-or-newer GPU); otherwise SDPA, which picks the best kernel the GPU has."""
    init_kwargs = training.get("model_init_kwargs") or {}
    where = "here" if on_this_machine else "in the job's dependencies"
    if "attn_implementation" in init_kwargs:
        attention, why = str(init_kwargs["attn_implementation"]), f"{GIVEN} (model_init_kwargs.attn_implementation)"
    elif flavor.is_gpu and flavor.bf16 and on_this_machine and flash_attention_installed():
        attention, why = "flash_attention_2", "flash-attn is installed and the GPU is Ampere or newer: varlen kernels"
    elif flavor.is_gpu:
        kernel = "its FlashAttention kernel" if flavor.bf16 else "its memory-efficient kernel (T4: no FlashAttention)"
        attention, why = "sdpa", f"PyTorch's scaled-dot-product attention, with {kernel}; flash-attn is not {where}"
    else:
        attention, why = "sdpa", "PyTorch's fused CPU attention"
    arguments = {}
    if "attn_implementation" not in init_kwargs:
        arguments["model_init_kwargs"] = {**init_kwargs, "attn_implementation": attention}
    return SpeedChoice(setting="attention", value=attention, reason=why), arguments


def _batching(
    method: str,
    training: dict[str, Any],
    gpu: bool,
    attention: str,
    rows_over_max_length: int,
    every_row_measured: bool,
    whole_epochs: bool,
) -> tuple[SpeedChoice, dict[str, Any]]:
    """How rows share a batch, so that little compute goes to padding: the spec's batching, what
    the method's trainer does, or on a CPU padded batches; on a GPU `_gpu_batching` decides."""
    batching: Batching
    arguments: dict[str, Any] = {}
    if _spec_sets(training, "packing", "padding_free", "train_sampling_strategy"):
        batching, why, arguments = _given_batching(training, rows_over_max_length)
    elif method_definition(method).batching:  # the trainer batches its own way
        batching, why = "padded", method_definition(method).batching
    elif not gpu:
        batching = "padded"
        why = (
            "padded batches in random order, the batch split chosen for speed (micro-batch 1 has no "
            "padding at all): on this CPU micro-batch 1 ran 2.9-3.2x TRL's defaults (tiny, SmolLM2-135M) with the same held-out loss; "
            "grouping rows by length ran 2.7x and reorders the rows, which changed what short runs learnt"
        )
    else:
        batching, why, arguments = _gpu_batching(attention, rows_over_max_length, every_row_measured, whole_epochs)
    return SpeedChoice(setting="batching", value=batching, reason=why), arguments


ROWS_ATTENTION = "sdpa_rows"  # the script's finetune_attention.py: SDPA row by row in a padding-free batch


def padding_free_speed(speed: SpeedPlan) -> SpeedPlan:
    """The same choices with padding-free batches, which trained fastest on this CPU when the
    probe timed them. Not TRL's `padding_free` argument, which cannot cut rows at max_length:
    the script swaps TRL's collator into its padding-free mode after the rows are cut
    (CONFIG["padding_free_batches"], tasks/plan/script.py), so max_length still holds."""
    why = (
        "padding-free: rows cut at max_length as usual, then concatenated with positions restarting at each row, "
        "no padding (TRL's collator, swapped in by the script); timed fastest here"
    )
    batching = SpeedChoice(setting="batching", value="padding_free", reason=why)
    return _attention_by_rows(
        speed.model_copy(
            update={
                "batching": "padding_free",
                "choices": [batching if c.setting == "batching" else c for c in speed.choices],
            }
        )
    )


def _attention_by_rows(speed: SpeedPlan) -> SpeedPlan:
    """Padding-free batches on a CPU attend row by row (the script's finetune_attention.py),
    unless the spec chose the kernel: SDPA over the whole batch would compute every pair of rows
    (measured on the tiny model, 8 rows of 16-512 tokens: 1.8x the tokens/s of SDPA's mask)."""
    if speed.reason("attention").startswith(GIVEN):
        return speed
    why = "SDPA row by row within each padding-free batch (finetune_attention.py): no attention across rows"
    attention = SpeedChoice(setting="attention", value=ROWS_ATTENTION, reason=why)
    init_kwargs = speed.arguments.get("model_init_kwargs") or {}
    return speed.model_copy(
        update={
            "attention": ROWS_ATTENTION,
            "choices": [attention if c.setting == "attention" else c for c in speed.choices],
            "arguments": {
                **speed.arguments,
                "model_init_kwargs": {**init_kwargs, "attn_implementation": ROWS_ATTENTION},
            },
        }
    )


def _given_batching(training: dict[str, Any], rows_over_max_length: int) -> tuple[Batching, str, dict[str, Any]]:
    """The batching the spec sets. TRL refuses padding-free batches at a max_length without
    packing: a max_length the spec sets is an error, the method default's is unset."""
    if training.get("packing"):
        batching: Batching = "packed"
    elif training.get("padding_free"):
        batching = "padding_free"
    elif training.get("train_sampling_strategy") == "group_by_length":
        batching = "grouped"
    else:
        batching = "padded"
    why, arguments = GIVEN, {}
    if batching == "padding_free" and training.get("max_length") is not None:
        raise SpecError(
            f"training: padding_free without packing cannot cut rows at max_length {training['max_length']} "
            "(TRL refuses it). Set max_length: null (rows are kept whole), or packing: true "
            "(rows packed into max_length sequences), or drop padding_free."
        )
    if batching == "padding_free" and "max_length" not in training:
        arguments["max_length"] = None
        why += "; padding-free without packing cannot truncate, so max_length is unset"
        if rows_over_max_length:
            why += f": {rows_over_max_length:,} rows over max_length are not cut"
    return batching, why, arguments


def _gpu_batching(
    attention: str, rows_over_max_length: int, every_row_measured: bool, whole_epochs: bool
) -> tuple[Batching, str, dict[str, Any]]:
    """Batching on a GPU. Padding-free batches cannot cut rows (TRL), so they are chosen only when
    no row reaches max_length, known for every row (a sample could miss one long row); grouped
    batches only when the run ends at an epoch's end (they end on the shortest rows)."""
    uncut = rows_over_max_length == 0 and every_row_measured
    batching: Batching
    if attention == "flash_attention_2" and uncut:
        batching = "padding_free"
        why = "padding-free: rows are concatenated and FlashAttention's varlen kernel keeps them apart, no padding"
    elif whole_epochs:
        batching = "grouped"
        why = (
            "rows of similar length share a batch (group_by_length), so little compute goes to padding; "
            "measured faster than padding-free batching with SDPA, whose block-diagonal mask spans the "
            "whole batch (benchmarks/results/throughput-*.md)"
        )
        if attention == "flash_attention_2":
            why += f"; not padding-free: {rows_over_max_length:,} rows exceed max_length and it would not cut them"
    elif uncut:
        batching = "padding_free"
        why = (
            "padding-free (no compute on padding, rows in their random order): max_steps ends the run within "
            "the first epoch, and grouped batches run longest to shortest within each mega-batch, so a run "
            "stopped early would end on the shortest rows (measured: a 12-step SFT warm-up grouped this way "
            "left GRPO unable to learn)"
        )
    else:
        batching = "padded"
        why = (
            "padded batches in random order: max_steps ends the run within the first epoch (grouped "
            "batches would end on the shortest rows), and padding-free batches would not cut the rows "
            "over max_length"
        )
    if batching == "padding_free":
        # nothing reaches max_length, so unsetting it (TRL requires that) cuts nothing
        return batching, why, {"padding_free": True, "max_length": None}
    if batching == "grouped":
        return batching, why, {"train_sampling_strategy": "group_by_length"}
    return batching, why, {}


def _precision(training: dict[str, Any], flavor: Flavor) -> tuple[SpeedChoice, dict[str, Any]]:
    """Mixed precision where the GPU computes it fast (bf16, else fp16 with loss scaling);
    float32 on a CPU, where bf16 matmuls are slow."""
    gpu = flavor.is_gpu
    if _spec_sets(training, "bf16", "fp16"):
        precision, why = ("bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "float32"), GIVEN
    elif gpu and flavor.bf16:
        precision, why = "bf16", "bf16 mixed precision: the GPU has bf16 tensor cores"
    elif gpu:
        precision, why = "fp16", "fp16 with loss scaling: this GPU has no bf16 (float32 weights, fp16 compute)"
    else:
        precision, why = "float32", "bf16 matmuls on a CPU are many times slower (TRL defaults to bf16)"
    arguments = {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not gpu}
    return SpeedChoice(setting="precision", value=precision, reason=why), arguments


def _optimizer(training: dict[str, Any], gpu: bool) -> tuple[SpeedChoice, dict[str, Any]]:
    """AdamW as one fused kernel, on a CPU too: there torch's default is a loop over the tensors
    (foreach is for GPUs only), 3.5x slower on the tiny model (4.4 against 1.2 ms a step, the
    same losses; measured by hand with torch 2.13)."""
    if "optim" in training:
        optim, why = str(training["optim"]), GIVEN
    else:
        optim = "adamw_torch_fused"
        why = "AdamW as one fused kernel over all parameters"
        why += "" if gpu else " (torch's CPU default loops over them)"
    return SpeedChoice(setting="optimizer", value=optim, reason=why), {"optim": optim}


def _liger(training: dict[str, Any], gpu: bool, model_type: str) -> tuple[SpeedChoice, dict[str, Any]]:
    """Liger's fused kernels where they can run: Triton on a GPU, for an architecture that the
    installed liger-kernel patches."""
    if "use_liger_kernel" in training:
        liger, why = bool(training["use_liger_kernel"]), GIVEN
    elif not gpu:
        liger, why = False, "Liger's kernels are Triton GPU kernels"
    elif model_type in (supported := liger_model_types()):
        liger = True
        why = "fused RMSNorm, RoPE, SwiGLU and a linear cross-entropy that never holds the whole logits"
    elif not supported:
        liger, why = False, "liger-kernel is not installed here (pip install liger-kernel lets the planner use it)"
    else:
        liger, why = False, f"liger-kernel does not patch the {model_type} architecture"
    arguments = {"use_liger_kernel": True} if liger else {}
    return SpeedChoice(setting="liger", value="on" if liger else "off", reason=why), arguments


def _data_loading(training: dict[str, Any], flavor: Flavor) -> tuple[SpeedChoice, dict[str, Any]]:
    """Worker processes and pinned memory keep a GPU fed; on a CPU workers would take the
    training's own cores."""
    gpu = flavor.is_gpu
    if _spec_sets(training, "dataloader_num_workers", "dataloader_pin_memory"):
        workers = int(training.get("dataloader_num_workers", 0))
        pin = bool(training.get("dataloader_pin_memory", gpu))
        why = GIVEN
    elif gpu:
        workers, pin = min(4, max(1, flavor.vcpus // 4)), True
        why = "batches are collated in worker processes while the GPU computes; pinned memory copies faster"
    else:
        workers, pin = 0, False
        why = "no workers: on a CPU they would take cores from the training itself"
    arguments = {"dataloader_num_workers": workers, "dataloader_pin_memory": pin}
    return SpeedChoice(setting="data loading", value=f"{workers} workers, pin {pin}", reason=why), arguments


def padding_overhead(
    percentiles: list[int], rows: int, max_length: int, micro_batch: int, global_batch: int, batching: Batching
) -> float:
    """Tokens computed per real token: 1.0 without padding; for padded batches simulated on
    as many rows as the dataset has (up to SIMULATED_ROWS: grouping is weaker on few rows),
    drawn from the measured length distribution and batched as transformers' samplers do."""
    n = min(rows, SIMULATED_ROWS)
    if batching in ("padding_free", "packed") or micro_batch <= 1 or len(percentiles) < 2 or n < micro_batch:
        return 1.0
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(0)
    # inverse-CDF sampling from the percentiles, linear between them
    u = torch.rand(n, generator=generator) * (len(percentiles) - 1)
    points = torch.tensor(percentiles, dtype=torch.float64)
    low = u.floor().long().clamp(max=len(percentiles) - 2)
    lengths = (points[low] + (u - low) * (points[low + 1] - points[low])).round().clamp(1, max_length).long()
    if batching == "grouped":
        order = torch.tensor(get_length_grouped_indices(lengths.tolist(), global_batch, generator=generator))
    else:
        order = torch.randperm(n, generator=generator)
    usable = n - n % micro_batch
    batches = lengths[order[:usable]].view(-1, micro_batch)
    return float(batches.max(dim=1).values.sum() * micro_batch / batches.sum())
