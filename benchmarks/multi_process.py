"""One training process against several, side by side, through the launch the engine generates.

    python -m benchmarks.multi_process [--processes 2] [--steps 48] [--global-batch 8] [--model tiny]

Both runs are planned by the engine's own code (as `--dry-run` does) from the same spec, with
the same global batch (divided among the processes) and the same optimizer steps; each
`train.py` then runs as every backend runs it (`python train.py`, which launches accelerate
itself when its plan has several processes). Measured from each run's `train_result.json`:
the training seconds (start-up and saving excluded), real tokens per second in all and per
process, the peak memory, and the wall time with start-up. On a CPU the processes share the
cores, so the ratio of tokens per second is the scaling efficiency the planner assumes for a
CPU (tasks/plan/cost.py SCALING_EFFICIENCY); on a multi-GPU machine, each process has a GPU.
Results go to benchmarks/results/multi-process-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def plan_and_run(processes: int, steps: int, global_batch: int, model: str, runs: Path) -> dict[str, Any]:
    from flows.planning import plan_run
    from tasks.core.spec import parse_spec

    spec = parse_spec(
        {
            "model": model,
            "dataset": str(REPO / "examples" / "data" / "sft_chat.jsonl"),
            "distributed": {"processes": processes},
            "training": {
                "max_steps": steps,
                "learning_rate": 3.0e-3,
                "per_device_train_batch_size": global_batch,  # the global batch: the plan divides it among the processes
                "max_length": 128,
                "logging_steps": 8,
            },
            "evaluation": {"held_out": 0},
            "outputs": {"gguf": []},
            "name": f"bench-{processes}p",
        }
    )
    os.environ["FINETUNE_RUNS_DIR"] = str(runs)
    plan = plan_run(spec)
    run_dir = Path(plan.run_dir)
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "train.py"],
        cwd=run_dir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    measured = json.loads((run_dir / "train_result.json").read_text())["measured"]
    return {
        "processes": processes,
        "strategy": plan.hardware.strategy,
        "global_batch": measured.get("global_batch"),
        "optimizer_steps": measured["optimizer_steps"],
        "train_s": measured["train_s"],
        "tokens": measured["tokens"],
        "tokens_per_s": round(measured["tokens"] / measured["train_s"], 1),
        "tokens_per_s_per_process": round(measured["tokens"] / measured["train_s"] / processes, 1),
        "peak_memory_gb": measured["peak_memory_gb"],
        "wall_s": round(wall, 2),
        "planned_compute_s": round(plan.cost.compute_s, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-mp-") as tmp:
        one = plan_and_run(1, args.steps, args.global_batch, args.model, Path(tmp))
        many = plan_and_run(args.processes, args.steps, args.global_batch, args.model, Path(tmp))
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"device": device, "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": args.model,
        "command": f"python -m benchmarks.multi_process --processes {args.processes} --steps {args.steps} "
        f"--global-batch {args.global_batch} --model {args.model}",
        "runs": [one, many],
        "tokens_per_s_ratio": round(ratio, 3),
        "wall_ratio": round(many["wall_s"] / one["wall_s"], 3),
    }
    name = "multi-process-" + ("cpu" if device == "cpu" else device.lower().replace(" ", "-"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "| processes | strategy | global batch | steps | train s | tokens/s | tokens/s per process | peak GB | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (one, many):
        rows.append(
            f"| {r['processes']} | {r['strategy']} | {r['global_batch']} | {r['optimizer_steps']} | {r['train_s']} | "
            f"{r['tokens_per_s']} | {r['tokens_per_s_per_process']} | {r['peak_memory_gb']} | {r['wall_s']} |"
        )
    text = "\n".join(
        [
            f"# One process against {args.processes}, {args.model} on {device}",
            "",
            f"`{result['command']}` ({result['when']}, {os.cpu_count()} CPUs)",
            "",
            *rows,
            "",
            f"{args.processes} processes / 1: tokens per second x{ratio:.2f}, wall time x{result['wall_ratio']:.2f}.",
            "",
        ]
    )
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
