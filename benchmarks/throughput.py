"""Training throughput: TRL's defaults against the fast-path configuration, side by side.

    python -m benchmarks.throughput [--model tiny|qwen2.5-0.5b|CONFIG.json] [--lora] [--steps 30]
                                    [--global-batch 16] [--variants defaults,fast] [--out benchmarks/results]

The same model (random init, built here: nothing is downloaded), the same data, the same
global batch, the same number of optimizer steps and the same seed for every variant; each
variant trains in a fresh process. The data is chat rows with a realistic spread of lengths
(`training.example_data.chat_rows_at_scale(spread="realistic")`: most answers short, a long
tail), rendered by the tiny model's chat template and tokenizer.

Variants (the training arguments are printed in the results):
- `defaults`: `SFTConfig()` as TRL 1.16 ships it (padding to the longest row of each batch,
  gradient checkpointing, per-device batch 8), only the run length, the global batch and the
  logging set; bf16 off on a CPU (TRL defaults to it, ~15x slower there), on on a GPU.
- `grouped`: padded batches of rows of similar length (`train_sampling_strategy=group_by_length`),
  otherwise as `fast`.
- `fast-flex`: `fast` with FlexAttention (block-sparse masks for the packed rows; GPU).
- `fast`: padding-free batches (TRL's `padding_free`: a batch's rows concatenated, positions
  restarting per row, so no token is padding and attention stays within each row), no
  gradient checkpointing, a larger micro-batch with the same global batch, on a GPU bf16,
  the fused AdamW, SDPA attention and pinned dataloader memory.

Measured per variant, after `--warmup` optimizer steps: real (non-padding) tokens per second,
time per optimizer step, peak memory (CUDA's peak allocation on a GPU, the process's peak RSS
on a CPU), MFU (training FLOPs per token from the planner's model, `tasks.memory`, over the
device's peak: the spec sheet's dense bf16 figure for a known GPU, a measured float32 matmul on
a CPU), and the training loss at every step. Ratios are printed against `defaults`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"qwen2.5-0.5b": REPO / "tests" / "data" / "configs" / "qwen2.5-0.5b.json"}
SPEC_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}  # dense bf16


def build_model(model: str, target: Path) -> Path:
    """The tiny model as the project builds it, or a random-init model of a config's shape
    with the tiny model's tokenizer (its ids fit every vocabulary)."""
    from training.tiny_model import ensure_tiny_model

    tiny = ensure_tiny_model()
    if model == "tiny":
        return tiny
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(Path(CONFIGS.get(model, model)).read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, target / name)
    return target


MAX_LENGTH = 1024  # TRL's default max_length: no row is longer, so no variant truncates


def fitting_rows(model_dir: Path, n: int, max_length: int) -> list[dict]:
    """n realistic chat rows that fit max_length tokens (longer ones are left out), so every
    variant trains on exactly the same tokens whether or not it truncates."""
    from transformers import AutoTokenizer

    from training.example_data import chat_rows_at_scale

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for row in chat_rows_at_scale(4 * n, spread="realistic"):
        if (
            len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
            <= max_length
        ):
            rows.append(row)
            if len(rows) == n:
                return rows
    raise SystemExit(f"only {len(rows)} of {n} rows fit {max_length} tokens")


def variant_args(variant: str, on_gpu: bool, global_batch: int, micro_batch: int) -> dict[str, Any]:
    common = {
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "data_seed": 0,
        "include_num_input_tokens_seen": "non_padding",
        "use_cpu": not on_gpu,
        "disable_tqdm": True,
    }
    if variant == "defaults":
        micro = 8  # TRL's per_device_train_batch_size
        return {
            **common,
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": global_batch // micro,
            "bf16": on_gpu,
        }
    if variant == "grouped":  # padded batches of rows of similar length: the other way to waste no compute
        return {
            **common,
            "per_device_train_batch_size": micro_batch,
            "gradient_accumulation_steps": global_batch // micro_batch,
            "train_sampling_strategy": "group_by_length",
            "gradient_checkpointing": False,
            "bf16": on_gpu,
            "optim": "adamw_torch_fused" if on_gpu else "adamw_torch",
            "dataloader_pin_memory": on_gpu,
            "dataloader_num_workers": 2 if on_gpu else 0,
        }
    if variant in ("fast", "fast-flex"):
        return {
            **common,
            "per_device_train_batch_size": micro_batch,
            "gradient_accumulation_steps": global_batch // micro_batch,
            "padding_free": True,
            "max_length": None,  # padding-free without packing: rows are not cut (the data fits)
            "gradient_checkpointing": False,
            "bf16": on_gpu,
            "optim": "adamw_torch_fused" if on_gpu else "adamw_torch",
            "dataloader_pin_memory": on_gpu,
            "dataloader_num_workers": 2 if on_gpu else 0,
        }
    raise SystemExit(f"unknown variant {variant}")


def child(args: argparse.Namespace) -> None:
    """One variant's training, in this fresh process; prints one JSON line."""
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tasks.memory import Architecture, Workload, flops_per_token

    on_gpu = torch.cuda.is_available()
    training = variant_args(args.child, on_gpu, args.global_batch, args.micro_batch)
    training["max_steps"] = args.steps
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    attention = "flex_attention" if args.child == "fast-flex" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation=attention)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    dataset = load_dataset("json", data_files=args.data, split="train", cache_dir=str(Path(args.data).parent / "cache"))
    config = trl.SFTConfig(output_dir=str(Path(args.data).parent / f"out-{args.child}"), **training)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int]] = []

        def on_step_end(self, a, state, control, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

    clock = Clock()
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (s0, t0, n0), (s1, t1, n1) = clock.marks[args.warmup - 1], clock.marks[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)
    arch = Architecture.from_config(model.config if peft_config is None else trainer.model.base_model.model.config)
    mean_len = max(1, n1 // max(1, args.steps * args.global_batch))
    work = Workload(
        mode="lora" if args.lora else "full",
        micro_batch=training["per_device_train_batch_size"],
        seq_len=int(mean_len),
        checkpointing=bool(trainer.args.gradient_checkpointing),
    )
    if on_gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in SPEC_PEAK_TFLOPS.items() if k in name), None)
        peak_flops = peak * 1e12 if peak else None
        memory_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        from tasks.cost import measured_cpu_flops

        name, peak_flops = f"CPU ({os.cpu_count()} cores)", measured_cpu_flops()
        memory_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(
        "RESULT "
        + json.dumps(
            {
                "variant": args.child,
                "device": name,
                "tokens_per_s": round(tokens_per_s, 1),
                "step_s": round((t1 - t0) / (s1 - s0), 4),
                "peak_memory_gb": round(memory_gb, 3),
                "mfu": round(tokens_per_s * flops_per_token(arch, work) / peak_flops, 4) if peak_flops else None,
                "real_tokens": n1,
                "losses": [round(x, 4) for x in losses],
                "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
                "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
                "training": {k: v for k, v in training.items() if k not in ("report_to", "disable_tqdm")}
                | {"attn_implementation": attention},
            }
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=16, help="the fast variant's per-device batch")
    parser.add_argument("--rows", type=int, default=0, help="rows of data (default: enough for the steps)")
    parser.add_argument("--variants", default="defaults,fast")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from training.example_data import write_jsonl_stream

    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        model_dir = build_model(args.model, work / "model")
        data = work / "chat.jsonl"
        write_jsonl_stream(fitting_rows(model_dir, args.rows or args.steps * args.global_batch, MAX_LENGTH), data)
        results = []
        for variant in args.variants.split(","):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.throughput",
                "--child",
                variant,
                "--model-dir",
                str(model_dir),
                "--data",
                str(data),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--global-batch",
                str(args.global_batch),
                "--micro-batch",
                str(args.micro_batch),
            ]
            cmd += ["--lora"] if args.lora else []
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:  # reported, and the other variants still run
                print(
                    f"variant {variant} failed ({proc.returncode}):",
                    proc.stdout[-2000:],
                    proc.stderr[-4000:],
                    file=sys.stderr,
                    flush=True,
                )
                continue
            result = json.loads(line[7:]) | {"process_s": round(time.perf_counter() - start, 1)}
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results or results[0]["variant"] != args.variants.split(",")[0]:
        raise SystemExit("the baseline variant did not run: no ratios to report")
    write_results(results, args)
    return 0


def write_results(results: list[dict], args: argparse.Namespace) -> None:
    base = results[0]
    device = base["device"]
    slug = "cpu" if device.startswith("CPU") else device.split()[-1].lower().replace(" ", "-")
    name = f"throughput-{args.model.replace('.', '')}-{'lora' if args.lora else 'full'}-{slug}"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {
                "measured": when,
                "machine": platform.platform(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
            },
            indent=2,
        )
    )
    lines = [
        f"# Throughput: TRL defaults vs the fast path ({args.model}, {'LoRA' if args.lora else 'full fine-tuning'})",
        "",
        f"Measured {when} on {device} ({platform.platform()}).",
        "",
        f"Reproduce: `python -m benchmarks.throughput --model {args.model}{' --lora' if args.lora else ''} "
        f"--steps {args.steps} --global-batch {args.global_batch} --micro-batch {args.micro_batch}`. "
        f"{args.steps} optimizer steps of {args.global_batch} rows, timed after {args.warmup}; "
        "chat rows with a realistic length spread.",
        "",
        "| variant | real tokens/s | ratio | step s | peak memory GB | MFU | mean loss, last 5 steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['step_s']} | {r['peak_memory_gb']} | {mfu} | {r['final_loss']} |"
        )
    lines += ["", "Training arguments per variant:", ""]
    lines += [f"- {r['variant']}: `{json.dumps(r['training'])}`" for r in results]
    n = min(len(r["losses"]) for r in results)
    lines += [
        "",
        "Loss at equal steps (every 5th step):",
        "",
        "| step | " + " | ".join(r["variant"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    lines += [f"| {i + 1} | " + " | ".join(str(r["losses"][i]) for r in results) + " |" for i in range(0, n, 5)]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
