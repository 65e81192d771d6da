"""How fast a CPU core runs AdamW's update: the step FSDP's CPU offload moves off the GPU.

    python -m benchmarks.cpu_optimizer [--params 20000000] [--repeats 5]

torch's AdamW (the Trainer's default, `foreach`) updates one tensor of `--params` parameters
with its gradient, on one thread, in bfloat16 (what a bf16 model offloads: its parameters, their
gradients and the optimizer state share the dtype) and in float32, measured side by side. The
best of `--repeats` steps after a warm-up is kept. The planner (tasks/plan/cost.py
CPU_ADAM_PARAMS_PER_CORE_S) assumes the bfloat16 figure per core of a training node, each
process using its share of the node's cores. Results go to benchmarks/results/cpu-optimizer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def params_per_second(params: int, dtype: torch.dtype, repeats: int) -> float:
    weights = torch.nn.Parameter(torch.randn(params, dtype=dtype))
    weights.grad = torch.randn(params, dtype=dtype)
    optimizer = torch.optim.AdamW([weights], lr=1e-5, foreach=True)
    optimizer.step()  # warm-up: creates the moments
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return params / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=20_000_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    rates = {
        str(d).removeprefix("torch."): params_per_second(args.params, d, args.repeats)
        for d in (torch.bfloat16, torch.float32)
    }
    result = {
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "params": args.params,
        "threads": 1,
        "params_per_s_per_core": {k: round(v) for k, v in rates.items()},
        "command": "python -m benchmarks.cpu_optimizer",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu-optimizer.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# AdamW on one CPU core (the update FSDP's CPU offload runs on the host)",
        "",
        f"`{result['command']}`, {result['measured']}, {result['machine']}, {args.params:,} parameters, one thread.",
        "",
        "| dtype | parameters updated per second, one core |",
        "|---|---|",
        *(f"| {k} | {v / 1e6:.1f} M |" for k, v in rates.items()),
        "",
        "The planner assumes the bfloat16 figure per core of a training node (tasks/plan/cost.py",
        "CPU_ADAM_PARAMS_PER_CORE_S); a server core is assumed no slower than this one.",
    ]
    (RESULTS / "cpu-optimizer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
