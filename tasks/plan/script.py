"""Write the self-contained TRL training script, the contract a user can review.

The template is a real Python file in `training/templates/`; building fills in its CONFIG
(a literal dict) and its inline dependency metadata (PEP 723) pinned to the versions
installed here, so the script runs the same by hand, under `uv run`, or on a job runner.
"""

from __future__ import annotations

import hashlib
import pprint
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tasks.core.atomic import write_text
from tasks.core.methods import MethodDefinition
from tasks.core.models import HardwarePlan, TrainingScript
from tasks.core.spec import RunSpec
from tasks.plan.launch import LAUNCH_CONFIG, accelerate_config, render_launch_config
from tasks.plan.memory import TOWER_MARKERS

TEMPLATES = Path(__file__).resolve().parents[2] / "training" / "templates"
CONFIG_MARKER = "CONFIG: dict = {}  # @@CONFIG@@"
DEPENDENCIES_MARKER = "# dependencies = []  # @@DEPENDENCIES@@"
SCRIPT_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "trackio", "huggingface_hub")


def optional_packages(config: dict[str, Any]) -> tuple[str, ...]:
    """Packages the plan's choices need beyond the usual ones: 4-bit weights, fused kernels,
    the evaluation harness."""
    training = config.get("training", {})
    attention = (training.get("model_init_kwargs") or {}).get("attn_implementation")
    return (
        *(("bitsandbytes",) if config.get("quantization") == "4bit" else ()),
        *(("liger-kernel",) if training.get("use_liger_kernel") else ()),
        *(("flash-attn",) if attention == "flash_attention_2" else ()),
        *(("lm-eval",) if (config.get("evaluation") or {}).get("tasks") else ()),
    )


def pinned_dependencies(extra: tuple[str, ...] = ()) -> list[str]:
    pins = []
    for name in (*SCRIPT_PACKAGES, *extra):
        try:
            v = version(name).split("+")[0]  # drop local tags such as +cpu
            pins.append(f"{name}=={v}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def script_config(
    spec: RunSpec,
    method: MethodDefinition,
    run_name: str,
    model_path: str,
    plan: HardwarePlan,
    training_args: dict[str, Any],
) -> dict[str, Any]:
    lora = None
    if plan.mode != "full":
        lora = {
            "r": spec.lora.r,
            "lora_alpha": spec.lora.alpha,
            "lora_dropout": spec.lora.dropout,
            "target_modules": plan.lora_target_modules,
        }
    return {
        "trainer": method.trainer,
        "config_class": method.config_class,
        "model": model_path,
        "method": spec.method,
        "data": "data/train.jsonl",
        "heldout": "data/heldout.jsonl",  # evaluated before and after training
        # rows scored and answered per forward pass: the planned micro-batch (no gradients kept)
        "evaluation": {"generations": spec.evaluation.generations, "batch_size": plan.micro_batch},
        "split": spec.split,
        "seed": spec.seed,
        "dtype": plan.dtype,
        "lora": lora,
        "quantization": "4bit" if plan.mode == "qlora" else None,
        # a multimodal model's vision/audio towers are not trained (the plan's memory assumes so)
        "frozen": list(TOWER_MARKERS) if plan.frozen_tower_parameters else [],
        "project": run_name,
        "run_name": run_name,
        # several processes: the script re-executes itself through `accelerate launch` with this config
        "launch": (
            {
                "processes": plan.processes,
                "strategy": plan.strategy,
                "config_file": LAUNCH_CONFIG,
                "accelerate": accelerate_config(plan),
            }
            if plan.processes > 1
            else None
        ),
        "training": training_args,
    }


def render_script(method: MethodDefinition, config: dict[str, Any]) -> str:
    template = (TEMPLATES / method.template).read_text(encoding="utf-8")
    if CONFIG_MARKER not in template or DEPENDENCIES_MARKER not in template:
        raise RuntimeError(f"template {method.template} lacks its CONFIG or dependencies marker")
    pins = pinned_dependencies(optional_packages(config))
    deps = "# dependencies = [\n" + "".join(f'#   "{d}",\n' for d in pins) + "# ]"
    body = "CONFIG: dict = " + pprint.pformat(config, sort_dicts=False, width=100)
    return template.replace(DEPENDENCIES_MARKER, deps).replace(CONFIG_MARKER, body)


def build_script(method: MethodDefinition, config: dict[str, Any], run_dir: Path) -> TrainingScript:
    source = render_script(method, config)
    compile(source, "train.py", "exec")  # a template bug fails here, not on the job runner
    path = run_dir / "train.py"
    launch = run_dir / LAUNCH_CONFIG
    if config.get("launch"):
        write_text(launch, render_launch_config(config["launch"]))
    else:
        launch.unlink(missing_ok=True)  # a plan that had several processes before
    write_text(path, source)
    return TrainingScript(
        path=str(path),
        sha256=hashlib.sha256(source.encode()).hexdigest(),
        method=method.name,
        trainer=method.trainer,
        config=config,
    )
