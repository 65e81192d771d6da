"""Training throughput: TRL's defaults against the generated script's settings, side by side.

    python -m benchmarks.throughput [--model tiny|smollm2-135m|qwen2.5-0.5b|CONFIG.json] [--lora]
        [--rows 512] [--global-batch 8] [--variants defaults,planned,planned-seed1,padding-free]

The same model (random init, built here: nothing is downloaded; a name is one of
tests/data/configs/), the same data, the same global batch, one epoch over `--rows` rows, the
same seed; each variant trains in a fresh process. The data is chat rows with a realistic
spread of lengths (`training.example_data.chat_rows_at_scale(spread="realistic")`: most
answers short, a long tail), rendered by the tiny model's chat template and tokenizer.

Variants (the training arguments are printed in the results):
- `defaults`: `SFTConfig()` as TRL 1.16 ships it (padding to the longest row of each batch,
  gradient checkpointing, per-device batch 8), only the run length, the global batch and the
  logging set; bf16 off on a CPU (TRL defaults to it, ~15x slower there), on on a GPU.
- `planned`: the speed settings of the script the engine generates for this model and data on
  this machine (planned by the engine's own code, as `--dry-run` does: batch split,
  checkpointing, batching, attention, precision, optimizer, kernels, data loading); the
  learning rate and schedule stay TRL's, so the loss compares like with like.
- `planned-seed1`: `planned` with another data order: how far apart the held-out loss of two
  equally good runs lands (the noise band the loss comparison is read against).
- `padding-free`: `planned` with TRL's padding-free batches instead of its batching (rows
  concatenated, positions restarting per row; SDPA keeps them apart with a block-diagonal mask).
- `padding-free-rows`: the same, attending row by row (the script's `finetune_attention.py`,
  `sdpa_rows`: what the planner trains padding-free batches with on a CPU). A `-mN` suffix on
  either sets micro-batches of N rows, the global batch kept.
- `fast-flex`: `padding-free` with FlexAttention's block-sparse masks (GPU).

Measured per variant, after `--warmup` optimizer steps: real (non-padding) tokens per second,
time per optimizer step, peak memory (CUDA's peak allocation on a GPU, the process's peak RSS
on a CPU), MFU (training FLOPs per token from the planner's model, `tasks.plan.memory`, over the
device's peak: the spec sheet's dense bf16 figure for a known GPU, a measured float32 matmul on
a CPU), and the loss on held-out rows after the epoch, one row at a time (what was learnt,
whatever the batching). Ratios are printed against `defaults`.
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
CONFIGS = {p.stem: p for p in (REPO / "tests" / "data" / "configs").glob("*.json")}  # real models' shapes
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


# The keys of the generated script's training arguments that decide speed, not what is learnt:
# the `planned` variant takes these from the plan and everything else (learning rate, schedule)
# from TRL's defaults, like the baseline, so the loss compares like with like.
SPEED_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "train_sampling_strategy",
    "padding_free",
    "packing",
    "max_length",
    "bf16",
    "fp16",
    "optim",
    "use_liger_kernel",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "model_init_kwargs",
    "use_cpu",
)


def planned_args(model_dir: Path, data: Path, global_batch: int, work: Path) -> dict[str, Any]:
    """The speed choices of the script the engine generates for this model and data on this
    machine: planned by the engine's own code, as `--dry-run` does."""
    from flows.planning import plan_run
    from tasks.core.spec import RunSpec

    spec = RunSpec(
        method="sft",
        model=str(model_dir),
        dataset=str(data),
        backend="local",
        lora=False,
        training={"per_device_train_batch_size": global_batch, "max_length": MAX_LENGTH},
        outputs={"gguf": []},
        name="throughput-bench",
    )
    plan = plan_run(spec, runs_root=work / "runs")
    training = plan.script.config["training"]
    return {k: training[k] for k in SPEED_KEYS if k in training}


def variant_args(variant: str, on_gpu: bool, global_batch: int, planned: dict[str, Any]) -> dict[str, Any]:
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
        micro = min(8, global_batch)  # TRL's per_device_train_batch_size
        return {
            **common,
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": global_batch // micro,
            "bf16": on_gpu,
        }
    if variant == "planned":
        return {**common, **planned}
    if variant == "planned-seed1":  # the same, another data order: the loss's noise band
        return {**common, **planned, "seed": 1, "data_seed": 1}
    # padding-free batches instead of the planned batching (TRL's padding_free: rows concatenated,
    # positions restarting per row, attention kept within rows by a block-diagonal mask or a
    # varlen kernel); fast-flex: the same with FlexAttention's block-sparse masks (GPU)
    if variant.startswith(("padding-free", "fast-flex")):
        attention = (
            "flex_attention"
            if variant.startswith("fast-flex")
            else "sdpa_rows"
            if variant.startswith("padding-free-rows")
            else "sdpa"
        )
        rest = {k: v for k, v in planned.items() if k != "train_sampling_strategy"}
        if "-m" in variant:  # e.g. padding-free-m2: micro-batches of 2, the global batch kept
            micro = int(variant.rsplit("-m", 1)[1])
            rest |= {"per_device_train_batch_size": micro, "gradient_accumulation_steps": global_batch // micro}
        return {
            **common,
            **rest,
            "padding_free": True,
            "max_length": None,  # padding-free without packing does not cut: the data fits
            "model_init_kwargs": {"attn_implementation": attention},
        }
    raise SystemExit(f"unknown variant {variant}")


def held_out_loss(model: Any, tokenizer: Any, rows: list[dict]) -> float:
    """Mean next-token loss over held-out rows, one row at a time (no padding, no batching
    choice can touch it): the same measure for every variant, of what it learnt."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            ids = torch.tensor([ids], device=model.device)
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def child(args: argparse.Namespace) -> None:
    """One variant's training, in this fresh process; prints one JSON line."""
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tasks.plan.memory import Architecture, Workload, flops_per_token

    on_gpu = torch.cuda.is_available()
    training = variant_args(args.child, on_gpu, args.global_batch, json.loads(args.planned))
    training["max_steps"] = args.steps
    init_kwargs = training.pop("model_init_kwargs", None) or {"attn_implementation": "sdpa"}
    if init_kwargs.get("attn_implementation") == "sdpa_rows":  # as the generated script does
        from training.templates.finetune_attention import register

        register()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, **init_kwargs)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    folder = Path(args.data).parent
    dataset = load_dataset("json", data_files=args.data, split="train", cache_dir=str(folder / "cache"))
    config = trl.SFTConfig(output_dir=str(folder / f"out-{args.child}"), **training)

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
        from tasks.plan.flavors import measured_cpu_flops

        name, peak_flops = f"CPU ({os.cpu_count()} cores)", measured_cpu_flops()
        memory_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    held_out = [json.loads(line) for line in Path(args.held_out).read_text().splitlines()]
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
                "held_out_loss": round(held_out_loss(trainer.model, tokenizer, held_out), 4),
                "training": {k: v for k, v in training.items() if k not in ("report_to", "disable_tqdm")}
                | {"model_init_kwargs": init_kwargs},
            }
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--rows", type=int, default=512, help="training rows: the run is one epoch over them")
    parser.add_argument("--held-out", type=int, default=64, help="rows the held-out loss is measured on")
    parser.add_argument("--warmup", type=int, default=4, help="optimizer steps not timed")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--variants", default="defaults,planned,planned-seed1,padding-free")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    for hidden in ("--child", "--model-dir", "--data", "--planned", "--steps"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--held-out-file", dest="held_out_path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.steps, args.warmup, args.global_batch = int(args.steps), int(args.warmup), int(args.global_batch)
        args.held_out = args.held_out_path
        child(args)
        return 0

    from training.example_data import write_jsonl_stream

    steps = args.rows // args.global_batch
    if steps <= args.warmup + 1:
        raise SystemExit(f"--rows {args.rows} gives {steps} steps of {args.global_batch}: too few to time")
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        model_dir = build_model(args.model, work / "model")
        rows = fitting_rows(model_dir, args.rows + args.held_out, MAX_LENGTH)
        data, held_out = work / "chat.jsonl", work / "held_out.jsonl"
        write_jsonl_stream(rows[: args.rows], data)
        write_jsonl_stream(rows[args.rows :], held_out)
        planned = planned_args(model_dir, data, args.global_batch, work)
        print("planned:", json.dumps(planned), flush=True)
        results = []
        for variant in args.variants.split(","):
            cmd = [sys.executable, "-m", "benchmarks.throughput", "--child", variant, "--model-dir", str(model_dir)]
            cmd += ["--data", str(data), "--held-out-file", str(held_out), "--planned", json.dumps(planned)]
            cmd += ["--steps", str(steps), "--warmup", str(args.warmup), "--global-batch", str(args.global_batch)]
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
            print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "training")}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results or results[0]["variant"] != args.variants.split(",")[0]:
        raise SystemExit("the baseline variant did not run: no ratios to report")
    write_results(results, args, steps)
    return 0


def write_results(results: list[dict], args: argparse.Namespace, steps: int) -> None:
    base = results[0]
    device = base["device"]
    slug = "cpu" if device.startswith("CPU") else device.split()[-1].lower().replace(" ", "-")
    name = f"throughput-{Path(args.model).stem.replace('.', '')}-{'lora' if args.lora else 'full'}-{slug}"
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
    by = {r["variant"]: r for r in results}
    lines = [
        f"# Throughput: TRL defaults vs the generated script ({args.model}, "
        f"{'LoRA' if args.lora else 'full fine-tuning'})",
        "",
        f"Measured {when} on {device} ({platform.platform()}).",
        "",
        f"Reproduce: `python -m benchmarks.throughput --model {args.model}{' --lora' if args.lora else ''} "
        f"--rows {args.rows} --global-batch {args.global_batch} --variants {args.variants}`. "
        f"One epoch: {steps} optimizer steps of {args.global_batch} chat rows with a realistic length spread, "
        f"timed after {args.warmup}; each variant in a fresh process; held-out loss on {args.held_out} other rows.",
        "",
        "| variant | real tokens/s | ratio | step s | peak memory GB | MFU | held-out loss after the epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['step_s']} | {r['peak_memory_gb']} | {mfu} | {r['held_out_loss']} |"
        )
    if "planned" in by and "planned-seed1" in by:
        noise = abs(by["planned"]["held_out_loss"] - by["planned-seed1"]["held_out_loss"])
        gap = abs(by["planned"]["held_out_loss"] - base["held_out_loss"])
        lines += [
            "",
            f"Held-out loss, planned vs defaults: {gap:.4f} apart; planned with another data order (seed 1): "
            f"{noise:.4f} apart (the noise band of the data order alone).",
        ]
    lines += ["", "Training arguments per variant (besides max_steps, logging and seeds):", ""]
    skip = ("logging_steps", "save_strategy", "seed", "data_seed", "include_num_input_tokens_seen", "max_steps")
    lines += [
        f"- {r['variant']}: `{json.dumps({k: v for k, v in r['training'].items() if k not in skip})}`" for r in results
    ]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
