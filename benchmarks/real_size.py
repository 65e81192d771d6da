"""The whole lifecycle on a real-size model, on this CPU: time and peak memory per stage,
and the plan's memory and time next to what was measured.

    python -m benchmarks.real_size [--steps 4] [--out benchmarks/results/real_size.md]

The model is a random-init model of Qwen2.5-0.5B's exact configuration
(tests/data/configs/qwen2.5-0.5b.json: 494,032,768 parameters, hidden 896, vocabulary
151,936) with the embedded tiny tokenizer (the converter pads the vocabulary). It goes
through the project's own stage functions, as the flow runs them: plan, LoRA training for a
few steps by the generated script, merge, GGUF f16 and Q4_K_M (896 is not a multiple of
256: llama.cpp's fallbacks are recorded), smoke tests, and publishing to a folder. Peak
memory is the largest resident set of this process and its children, sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "data" / "configs" / "qwen2.5-0.5b.json"


class PeakMemory:
    """The largest RSS of this process plus its children while a block runs."""

    def __init__(self) -> None:
        self.peak = self.children_peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            own, children = me.memory_info().rss, 0
            for p in me.children(recursive=True):
                try:
                    children += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, own + children)
            self.children_peak = max(self.children_peak, children)
            time.sleep(0.1)

    @contextmanager
    def watch(self):
        self.peak, self.children_peak, self._stop = psutil.Process().memory_info().rss, 0, threading.Event()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def build_model(target: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.tiny_model import ensure_tiny_model

    data = json.loads(CONFIG.read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tiny = ensure_tiny_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, target / name)
    return sum(p.numel() for p in model.parameters())


def run(steps: int, work: Path) -> dict[str, Any]:
    from flows.planning import plan_run
    from tasks.core.spec import parse_spec
    from tasks.export.gguf import convert_gguf
    from tasks.export.gguf_smoke import smoke_test_all
    from tasks.export.gguf_summary import fallback_text
    from tasks.export.hub import push_to_hub
    from tasks.run.backends import JobRequest
    from tasks.run.backends.local import LocalBackend
    from tasks.run.fetch import fetch_artifacts
    from tasks.run.monitor import Guard, monitor_job

    os.environ["FINETUNE_RUNS_DIR"] = str(work / "runs")
    mem, stages = PeakMemory(), []

    def stage(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        with mem.watch():
            out = fn()
        stages.append(
            {
                "stage": name,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_gb": mem.peak / 2**30,
                "children_peak_gb": mem.children_peak / 2**30,
            }
        )
        print(f"{name}: {stages[-1]['seconds']} s, peak {stages[-1]['peak_gb']:.2f} GB", flush=True)
        return out

    model_dir = work / "qwen2.5-0.5b-random"
    params = stage("build random-init model", lambda: build_model(model_dir))
    spec = parse_spec(
        {
            "dataset": str(REPO / "examples" / "data" / "sft_chat.jsonl"),
            "model": str(model_dir),
            "name": "real-size",
            "lora": True,
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": 2,
                "max_length": 64,
                "logging_steps": 1,
                "save_steps": 1000,
                "learning_rate": 1e-4,
            },
            "outputs": {
                "hub_repo": str(work / "published"),
                "gguf": ["f16", "q4_k_m"],
                # Random weights give near-uniform logits (perplexity ~ vocabulary / 2), so which
                # token is top-1 is decided by noise smaller than 4-bit rounding: agreement is no
                # measure of this file here (a trained model's is: see the tiny model's 100%).
                # The perplexity ratio still applies. A spec threshold, as a user would set it.
                "gguf_min_agreement": {"q4_k_m": 0.5},
            },
        }
    )
    plan = stage("plan", lambda: plan_run(spec))
    backend = LocalBackend()
    request = JobRequest(
        run_name=plan.run_name,
        run_dir=plan.run_dir,
        script=plan.script,
        model_path=plan.model_path,
        flavor=plan.hardware.flavor,
        timeout_s=3600,
    )

    def train() -> Any:
        return monitor_job(backend, backend.submit(request), Guard(max_usd=1, price_per_hour_usd=0), poll_s=0.5)

    job = stage("train (LoRA) + merge + save", train)
    if job.state != "completed":
        raise SystemExit(f"training failed: {job.detail}")
    result = stage("fetch and check", lambda: fetch_artifacts(backend, _handle(plan), job))
    gguf = stage("convert_gguf (f16, q4_k_m)", lambda: convert_gguf(result, spec.outputs, Path(plan.run_dir), "real"))
    tested = stage(
        "smoke_test_gguf",
        lambda: smoke_test_all(
            gguf,
            Path(result.model_dir),
            Path(plan.dataset.heldout_path),
            Path(plan.dataset.prepared_path),
            spec.outputs,
        ),
    )
    published = stage("publish to a folder", lambda: push_to_hub(spec, plan, job, result, tested))
    training = next(s for s in stages if s["stage"].startswith("train"))
    return {
        "parameters": params,
        "steps": job.steps,
        "stages": stages,
        "plan": {
            "peak_memory_gb": plan.hardware.estimated_peak_memory_gb,
            "memory_breakdown_gb": plan.hardware.memory_breakdown_gb,
            "hours": plan.cost.hours,
            "startup_s": plan.cost.startup_s,
            "mode": plan.hardware.mode,
            "lora_target_modules": plan.hardware.lora_target_modules,
        },
        # the training process alone (a child), as the plan sizes it
        "measured": {"train_peak_gb": training["children_peak_gb"], "train_s": training["seconds"]},
        "loss": [p.loss for p in job.losses],
        "gguf": [
            {
                "type": f.quant,
                "size_mb": f.size_mb,
                "fallback": fallback_text(f),
                "top1_agreement": f.top1_agreement,
                "perplexity": f.perplexity,
                "hf_perplexity": f.hf_perplexity,
                "passed": f.passed,
                "problems": f.problems,
            }
            for f in tested.files
        ],
        "published": published.outcome.detail,
    }


def _handle(plan: Any) -> Any:
    from tasks.run.backends import load_handle

    return load_handle(Path(plan.run_dir))


def to_markdown(r: dict[str, Any]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Real-size lifecycle on this CPU: Qwen2.5-0.5B's configuration, random init",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} CPU cores ({cpu}), no GPU, with "
        "`python -m benchmarks.real_size`.",
        f"{r['parameters']:,} parameters; LoRA ({r['plan']['mode']}, targets {r['plan']['lora_target_modules']}), "
        f"{r['steps']} steps of batch 2 x 64 tokens; loss {', '.join(f'{x:.3f}' for x in r['loss'])} "
        "(random init: the loss says only that training ran). The Q4_K_M file is judged with "
        "`outputs.gguf_min_agreement: {q4_k_m: 0.5}`: random weights give near-uniform logits, whose "
        "top-1 is decided by noise below 4-bit rounding.",
        "",
        "| stage | seconds | peak memory (process + children) |",
        "|---|---|---|",
        *(
            f"| {s['stage']} | {s['seconds']} | "
            + (f"{s['peak_gb']:.2f} GB |" if s["peak_gb"] else "too short to sample |")
            for s in r["stages"]
        ),
        "",
        "## The plan next to the measurement (training)",
        "",
        "| | planned | measured | ratio |",
        "|---|---|---|---|",
        f"| peak memory of the training process | {r['plan']['peak_memory_gb']:.2f} GB | {r['measured']['train_peak_gb']:.2f} GB | "
        f"{r['plan']['peak_memory_gb'] / r['measured']['train_peak_gb']:.2f} |",
        f"| time (start-up included) | {r['plan']['hours'] * 3600:.0f} s | {r['measured']['train_s']:.0f} s | "
        f"{r['plan']['hours'] * 3600 / r['measured']['train_s']:.2f} |",
        "",
        "Planned breakdown: " + ", ".join(f"{k} {v:.3f} GB" for k, v in r["plan"]["memory_breakdown_gb"].items()),
        "",
        "## GGUF files",
        "",
        "| type | size | fallback tensors | top-1 agreement | perplexity (HF model) | published |",
        "|---|---|---|---|---|---|",
        *(
            f"| {g['type']} | {g['size_mb']:.0f} MB | {g['fallback']} | {g['top1_agreement']} | "
            f"{g['perplexity']} ({g['hf_perplexity']}) | {'yes' if g['passed'] else 'no: ' + '; '.join(g['problems'])} |"
            for g in r["gguf"]
        ),
        "",
        f"Publish: {r['published']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_size", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_size.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="real-size-") as tmp:
        result = run(args.steps, Path(tmp))
    args.out.write_text(to_markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
