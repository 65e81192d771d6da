"""Calibration: the planner's predicted peak memory and step time vs measured, side by side.

    python -m benchmarks.calibrate [--steps 20] [--out benchmarks/results/calibration.md]

Each case is planned by the project's own planning code (plan_run, as --dry-run does) and
then trained for real by the generated script, on this machine's CPU. Measured peak memory
is the training process's peak resident set (ru_maxrss); measured step time is TRL's
train_runtime / steps (start-up excluded, as in the prediction). Models are random-init
Qwen2s of a few sizes with the tiny tokenizer; rows are long enough to fill max_length.
Goal: memory within +-15%, time within +-25%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from flows.planning import plan_run
from tasks.core.spec import parse_spec
from tasks.plan.memory import GB
from training.tiny_model import ensure_tiny_model

MODELS = {
    "tiny-2.5M": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small-30M": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 8192,
    },
    "medium-110M": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
CASES = [
    ("tiny-2.5M", "full", 8, 128),
    ("tiny-2.5M", "full", 16, 256),
    ("small-30M", "full", 8, 256),
    ("small-30M", "lora", 8, 256),
    ("medium-110M", "full", 4, 256),
    ("medium-110M", "lora", 4, 384),
]


def build_model(name: str, shape: dict, tokenizer_dir: Path, root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    target = root / name
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tok), **shape}
    config = Qwen2Config(
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, max_position_embeddings=2048, **shape
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(target)
    tok.save_pretrained(target)
    return target


def long_rows(path: Path, n: int = 400) -> Path:
    rng = random.Random(0)
    words = "the model learns to add small numbers and answers in a fixed format every time".split()
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(600))}) + "\n")
    return path


def run_case(model_dir: Path, mode: str, batch: int, seq: int, steps: int, data: Path, runs: Path) -> dict:
    os.environ["FINETUNE_RUNS_DIR"] = str(runs)
    name = f"cal-{model_dir.name}-{mode}-b{batch}-s{seq}".lower().replace(".", "")
    spec = parse_spec(
        {
            "model": str(model_dir),
            "dataset": str(data),
            "name": name,
            "lora": mode == "lora",
            "outputs": {"gguf": []},
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": batch,
                "max_length": seq,
                "logging_steps": 5,
                "save_steps": 10_000,
                "learning_rate": 1e-3,
            },
        }
    )
    plan = plan_run(spec)
    proc = subprocess.Popen(
        [sys.executable, plan.script.path], cwd=plan.run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{name} failed; see {plan.run_dir}")
    result = json.loads((Path(plan.run_dir) / "train_result.json").read_text())
    measured_step = result["metrics"]["train_runtime"] / result["global_step"]
    predicted_step = (plan.cost.hours * 3600 - plan.cost.startup_s) / steps
    measured_gb = usage.ru_maxrss * 1024 / GB
    return {
        "case": name,
        "params": plan.hardware.parameters,
        "mode": mode,
        "batch": batch,
        "seq": seq,
        "predicted_gb": plan.hardware.estimated_peak_memory_gb,
        "measured_gb": round(measured_gb, 3),
        "memory_ratio": round(plan.hardware.estimated_peak_memory_gb / measured_gb, 3),
        "predicted_step_s": round(predicted_step, 4),
        "measured_step_s": round(measured_step, 4),
        "time_ratio": round(predicted_step / measured_step, 3),
        "breakdown": plan.hardware.memory_breakdown_gb,
    }


def to_markdown(rows: list[dict], steps: int) -> str:
    from tasks.plan.cost import STEP_OVERHEAD_S, UTILISATION
    from tasks.plan.flavors import measured_cpu_flops
    from tasks.plan.memory import LOGIT_BYTES_PER_ENTRY, RUNTIME_GB

    lines = [
        "# Planner calibration: predicted vs measured",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on this machine's CPU ({platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, matmul peak {measured_cpu_flops() / 1e9:.0f} GFLOP/s), {steps} steps "
        f"per case, with `python -m benchmarks.calibrate`. Constants in force: CPU utilisation {UTILISATION['cpu']}, "
        f"CPU runtime {RUNTIME_GB['cpu']} GB, logits {LOGIT_BYTES_PER_ENTRY} bytes per vocabulary entry per token, "
        f"step overhead {STEP_OVERHEAD_S['cpu']} s. "
        "Ratio = predicted / measured. Goal: memory within 0.85-1.15, time within 0.75-1.25.",
        "",
        "| case | parameters | predicted GB | measured GB | memory ratio | predicted s/step | measured s/step | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['predicted_gb']:.3f} | {r['measured_gb']:.3f} | "
            f"{r['memory_ratio']:.2f} | {r['predicted_step_s']:.4f} | {r['measured_step_s']:.4f} | {r['time_ratio']:.2f} |"
        )
    mem = [r["memory_ratio"] for r in rows]
    tim = [r["time_ratio"] for r in rows]
    lines += [
        "",
        f"Memory ratio range {min(mem):.2f}-{max(mem):.2f}; time ratio range {min(tim):.2f}-{max(tim):.2f}.",
        "",
        "No GPU was available to this run: GPU utilisation (tasks/plan/cost.py) remains an assumption.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration.md"))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    tiny = ensure_tiny_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = long_rows(root / "long.jsonl")
        for model, mode, batch, seq in CASES:
            model_dir = build_model(model, MODELS[model], tiny, root / "models")
            row = run_case(model_dir, mode, batch, seq, args.steps, data, root / "runs")
            print(json.dumps({k: v for k, v in row.items() if k != "breakdown"}), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(rows, args.steps))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(to_markdown(rows, args.steps))


if __name__ == "__main__":
    main()
