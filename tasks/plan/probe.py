"""Batch splits timed where the run trains: the planner's CPU split chosen by measurement.

On this machine's CPU the fastest split of a global batch depends on the model, the rows'
lengths and the machine (fixed costs per step, padding, attention across a padding-free batch)
more than a constant of the time model can say: it overestimated SFT 1.3-1.9x on the shipped
examples and mixed-length rows (benchmarks/results/estimates-cpu.md). So before the split is
fixed, the generated script's own probe (finetune_probe.py, next to train.py) trains a few steps
of each candidate here, and the hardware stage chooses, and the estimate prices, by the
measured rates. A result is kept in the cache folder per script, data and machine, so planning
the same run again does not probe again. Other flavors (a job's GPU) use the time model and
the calibration table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tasks.core.derived_cache import derived
from tasks.core.methods import method_definition
from tasks.core.models import CostEstimate, DatasetReport, HardwarePlan, SplitProbe, SplitRate
from tasks.core.spec import RunSpec, runs_on_this_machine
from tasks.plan.speed import padding_free_speed

PROBE_ENV = "FINETUNE_SPLIT_PROBE"  # "0": the time model chooses (the test suite's default, for speed)
TIMED_STEPS, TIMED_SECONDS = 6, 2.0  # per candidate: at most this many steps, fewer once this long
BUDGET_S = 90.0  # the probe's steps by the time model; beyond it fewer candidates are timed, or none
MAX_CANDIDATES = 4
WAIT_S = 4 * BUDGET_S  # how long a plan waits for another's probe (its longest) before the time model decides
PROBE_VERSION = 2  # bump when what finetune_probe.py measures changes: earlier results are not read
SPLIT_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "padding_free")


class ProbeFailed(RuntimeError):
    """The probe did not measure (it failed or ran out of time); nothing is cached."""


def why_not(spec: RunSpec, hardware: HardwarePlan, report: DatasetReport) -> str:
    """Why the split is not probed ("" when it is): only a one-process CPU run on this machine
    whose method and spec leave the split open."""
    if os.environ.get(PROBE_ENV, "1") == "0":
        return f"{PROBE_ENV}=0"
    if not runs_on_this_machine(spec.backend) or hardware.accelerator_count or hardware.processes > 1:
        return "the split is probed only for one training process on this machine's CPU"
    if not method_definition(spec.method).cpu_split_search:
        return f"{method_definition(spec.method).trainer} batches its own way"
    fixed = [
        k
        for k in ("gradient_accumulation_steps", "packing", "padding_free", "train_sampling_strategy")
        if k in spec.training
    ]
    if fixed:
        return f"the spec sets {', '.join(fixed)}"
    if hardware.global_batch < 2:
        return "a global batch of one row has one split"
    return ""


def candidates(hardware: HardwarePlan, vision: bool) -> list[dict[str, Any]]:
    """At most MAX_CANDIDATES, most likely fastest first: micro-batch 1 (no padding), the time
    model's split, padding-free batches of the whole global batch and of half of it (rows cut at
    max_length as in any batch; not for a vision model, whose rows TRL's padding-free collator
    does not take), and micro-batch 2."""
    total = hardware.global_batch
    found = [{"micro_batch": 1}, {"micro_batch": hardware.micro_batch}]
    if not vision:
        attention = padding_free_speed(hardware.speed).attention  # what the script would train them with
        found += [
            {"micro_batch": m, "padding_free": True, "attention": attention} for m in (total, total // 2) if m > 1
        ]
    found.append({"micro_batch": 2})
    unique = [c for i, c in enumerate(found) if c not in found[:i] and total % c["micro_batch"] == 0]
    return unique[:MAX_CANDIDATES]


def affordable(found: list[dict[str, Any]], cost: CostEstimate) -> tuple[list[dict[str, Any]], str]:
    """The candidates the probe can time within BUDGET_S by the time model's step time, the
    cheapest-to-learn first; none (and why) when even two would take longer."""
    step_s = cost.compute_s / max(cost.optimizer_steps, 1)
    per_candidate = step_s * (1 + max(2, min(TIMED_STEPS, TIMED_SECONDS / max(step_s, 1e-9))))
    for keep in (len(found), 2):
        if per_candidate * keep <= BUDGET_S:
            return found[:keep], ""
    return [], f"one optimizer step takes ~{step_s:.0f} s here by the time model: timing the splits would take minutes"


def probe_splits(script_dir: Path, config: dict[str, Any], found: list[dict[str, Any]]) -> SplitProbe:
    """Time the candidates with the script in script_dir (its CONFIG is `config`), or read an
    earlier probe of the same script, data and machine."""
    data = script_dir / str(config["data"])
    key = {
        "config": {k: v for k, v in config.items() if k not in ("run_name", "project", "training")},
        "training": {k: v for k, v in config["training"].items() if k not in SPLIT_KEYS},
        "data": hashlib.sha256(data.read_bytes()).hexdigest() if data.is_file() else str(config["data"]),
        "candidates": found,
        "machine": _machine(),
        "timing": [TIMED_STEPS, TIMED_SECONDS, PROBE_VERSION],
    }
    fresh = []

    def measure() -> dict[str, Any]:
        fresh.append(True)
        started = time.time()  # after any wait for another plan's probe
        return {"rates": _run(script_dir, found), "seconds": round(time.time() - started, 1)}

    try:  # one probe at a time on a machine: two would share its cores and both cache wrong rates
        found_before = derived("split-probe", key, measure, alone_within_s=WAIT_S)
    except ProbeFailed as e:
        return SplitProbe(note=f"the probe failed, so the time model chose the split: {e}")
    except TimeoutError as e:
        return SplitProbe(note=f"another plan was timing its splits on this machine ({e}), so the time model chose")
    rates = [SplitRate.model_validate(r) for r in found_before["rates"] if r["steps"] and r["seconds"] > 0]
    return SplitProbe(rates=rates, seconds=found_before["seconds"], cached=not fresh)


def _run(script_dir: Path, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """finetune_probe.py in its own process, as train.py would run here; its rates summed."""
    with tempfile.TemporaryDirectory(prefix="finetune-probe-out-") as tmp:
        out = Path(tmp) / "probe.json"
        command = [sys.executable, "finetune_probe.py", "--candidates", json.dumps(found), "--out", str(out)]
        command += ["--steps", str(TIMED_STEPS), "--seconds", str(TIMED_SECONDS)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("HF_DEBUG", None)  # it would log request bodies, tokens included
        try:
            done = subprocess.run(
                command, cwd=script_dir, env=env, capture_output=True, text=True, timeout=4 * BUDGET_S
            )
        except subprocess.TimeoutExpired as e:
            raise ProbeFailed(f"it ran past {4 * BUDGET_S:.0f} s") from e
        if done.returncode != 0 or not out.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ProbeFailed(f"finetune_probe.py exited {done.returncode}: {last[:300]}")
        return [_summed(r) for r in json.loads(out.read_text())]


def _summed(result: dict[str, Any]) -> dict[str, Any]:
    steps = result["steps"]
    return {
        "micro_batch": result["micro_batch"],
        "accumulation": result["accumulation"],
        "padding_free": result["padding_free"],
        "steps": len(steps),
        "seconds": round(sum(s["s"] for s in steps), 4),
        "real_tokens": sum(s["real"] for s in steps),
        "computed_tokens": sum(s["computed"] for s in steps),
        "warmup_s": result.get("warmup_s", 0.0),
    }


def _machine() -> dict[str, Any]:
    """What the rates depend on besides the script and the data."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": version("torch"), "trl": version("trl")}
