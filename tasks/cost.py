"""Stage 3: what the run will take, in hours and dollars, as a range.

Time is training FLOPs (6 per parameter per token for full fine-tuning, 4 with LoRA, where
no weight gradients are formed) over the throughput of the chosen hardware at an assumed
utilisation. On the local CPU the peak is measured on the spot with a matrix multiply, so
the estimate follows the machine it runs on. The local backend costs nothing.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from tasks.models import CostEstimate, DatasetReport, HardwarePlan

# Share of the measured matmul throughput a small-model training step achieves (optimizer,
# data collation and Python overheads take the rest); the range below covers its spread.
ASSUMED_UTILISATION = 0.3
RANGE_LOW, RANGE_HIGH = 0.5, 2.0


@lru_cache(maxsize=1)
def measured_cpu_flops(size: int = 512, seconds: float = 0.3) -> float:
    """Achieved float32 FLOP/s of this machine's CPU on a square matmul."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def training_tokens(report: DatasetReport, training_args: dict[str, Any]) -> int:
    per_row = min(report.tokens.mean, report.max_length)
    max_steps = int(training_args.get("max_steps", -1) or -1)
    if max_steps > 0:
        rows = (
            max_steps
            * int(training_args.get("per_device_train_batch_size", 1))
            * int(training_args.get("gradient_accumulation_steps", 1))
        )
    else:
        rows = report.train_rows * float(training_args.get("num_train_epochs", 1))
    return int(rows * per_row)


def estimate_cost(report: DatasetReport, plan: HardwarePlan, training_args: dict[str, Any]) -> CostEstimate:
    tokens = training_tokens(report, training_args)
    flops = (4 if plan.use_lora else 6) * plan.parameters * tokens
    if plan.flavor == "local-cpu":
        peak = measured_cpu_flops()
        price = 0.0
        peak_note = f"measured CPU matmul peak {peak / 1e9:.1f} GFLOP/s"
    else:
        import torch

        size = 4096
        a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        peak = 20 * 2 * size**3 / (time.perf_counter() - start)
        price = 0.0
        peak_note = f"measured GPU bf16 matmul peak {peak / 1e12:.1f} TFLOP/s"
    hours = flops / (peak * ASSUMED_UTILISATION) / 3600
    basis = (
        f"{tokens:,} training tokens x {4 if plan.use_lora else 6} FLOPs/parameter/token x "
        f"{plan.parameters:,} parameters = {flops:.3g} FLOPs; {peak_note} at an assumed "
        f"{ASSUMED_UTILISATION:.0%} utilisation; range x{RANGE_LOW}-x{RANGE_HIGH}; "
        f"{plan.backend} backend at ${price:.2f}/h"
    )
    return CostEstimate(
        flavor=plan.flavor,
        price_per_hour_usd=price,
        tokens=tokens,
        estimated_flops=flops,
        hours=hours,
        hours_low=hours * RANGE_LOW,
        hours_high=hours * RANGE_HIGH,
        usd=hours * price,
        usd_low=hours * RANGE_LOW * price,
        usd_high=hours * RANGE_HIGH * price,
        basis=basis,
    )
