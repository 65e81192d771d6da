"""Write the self-contained TRL training script, the contract a user can review.

The template is a real Python file in `training/templates/`; building fills in its CONFIG
(a literal dict) and its inline dependency metadata (PEP 723) pinned to the versions
installed here, so the script runs the same by hand, under `uv run`, or on a job runner.
The files it imports are written next to it: the template's siblings, copied unchanged, and
for GRPO the spec's reward files as modules of `finetune_rewards/`, which CONFIG names.
"""

from __future__ import annotations

import hashlib
import pprint
import re
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tasks.core.atomic import replace_path, write_text
from tasks.core.methods import MethodDefinition
from tasks.core.model_source import TOWER_MARKERS
from tasks.core.models import HardwarePlan, TrainingScript
from tasks.core.spec import RunSpec
from tasks.plan.launch import LAUNCH_CONFIG, accelerate_config, render_launch_config

TEMPLATES = Path(__file__).resolve().parents[2] / "training" / "templates"
CONFIG_MARKER = "CONFIG: dict = {}  # @@CONFIG@@"
DEPENDENCIES_MARKER = "# dependencies = []  # @@DEPENDENCIES@@"
# the template's siblings: copied next to train.py unchanged, imported by it
SIBLINGS = (
    "finetune_eval.py",
    "finetune_callbacks.py",
    "finetune_vision.py",
    "finetune_attention.py",
    "finetune_probe.py",
)
REWARDS_PACKAGE = "finetune_rewards"  # GRPO: the spec's reward files, one module each
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


def _lora_config(spec: RunSpec, plan: HardwarePlan) -> dict[str, Any] | None:
    """PEFT's LoraConfig arguments, or None when every weight trains."""
    if plan.mode == "full":
        return None
    lora: dict[str, Any] = {
        "r": spec.lora.r,
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": spec.lora.dropout,
        "target_modules": plan.lora_target_modules,
    }
    if plan.trained_tower_parameters:  # PEFT trains (and saves) these modules whole beside the adapter
        lora["modules_to_save"] = plan.tower_modules
    return lora


def script_config(
    spec: RunSpec,
    method: MethodDefinition,
    run_name: str,
    model_path: str,
    plan: HardwarePlan,
    training_args: dict[str, Any],
    vision: bool = False,
) -> dict[str, Any]:
    lora = _lora_config(spec, plan)
    return {
        "trainer": method.trainer,
        "config_class": method.config_class,
        "trainer_module": method.trainer_module,
        "head": method.head,
        "vision": vision,  # a vision-language model: loaded with its processor, rows with their images
        # padding-free batches of rows cut at max_length: TRL's collator swapped into that mode
        "padding_free_batches": plan.speed.batching == "padding_free" and not training_args.get("padding_free"),
        "model": model_path,
        "method": spec.method,
        "data": "data/train.jsonl",
        "heldout": "data/heldout.jsonl",  # evaluated before and after training
        # rows scored and answered per forward pass: the planned micro-batch (no gradients kept)
        "evaluation": {
            "measure": method.measure,
            "generations": spec.evaluation.generations,
            "batch_size": plan.micro_batch,
        },
        "split": spec.split,
        "seed": spec.seed,
        "dtype": plan.dtype,
        "lora": lora,
        "quantization": "4bit" if plan.mode == "qlora" else None,
        # a multimodal model's vision/audio towers are not trained (the plan's memory assumes so),
        # unless the spec's vision_tower says trained: then in full, beside a LoRA adapter too
        "frozen": list(TOWER_MARKERS) if plan.frozen_tower_parameters else [],
        "project": run_name,
        "run_name": run_name,
        # several processes: the script re-executes itself through `accelerate launch` with this config
        "launch": (
            {
                "processes": plan.processes,
                "nodes": plan.nodes,
                "strategy": plan.strategy,
                "config_file": LAUNCH_CONFIG,
                "accelerate": accelerate_config(plan),
            }
            if plan.processes > 1
            else None
        ),
        "training": training_args,
    }


def reward_modules(rewards: list[dict[str, Any]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The rewards (RewardSource dumps) as the script sees them: each reward's spec name, module
    and function for CONFIG, and the modules' files (one per source file, named after it)."""
    files = {f"{REWARDS_PACKAGE}/__init__.py": '"""The reward functions train.py imports (GRPO)."""\n'}
    modules: dict[tuple[str, str], str] = {}
    entries = []
    for reward in rewards:
        key = (reward["filename"], reward["source"])
        if key not in modules:
            stem = re.sub(r"\W", "_", Path(reward["filename"]).stem) or "rewards"
            stem = f"_{stem}" if stem[0].isdigit() else stem
            name, n = stem, 2
            while f"{REWARDS_PACKAGE}/{name}.py" in files:  # two files of one name, or one called __init__
                name, n = f"{stem}_{n}", n + 1
            files[f"{REWARDS_PACKAGE}/{name}.py"] = reward["source"]
            modules[key] = f"{REWARDS_PACKAGE}.{name}"
        entry = {"name": reward["name"], "module": modules[key], "function": reward["function"]}
        entries.append({**entry, "model": reward["model"]} if reward.get("model") else entry)
    return entries, files if entries else {}


def render_script(method: MethodDefinition, config: dict[str, Any]) -> str:
    template = (TEMPLATES / method.template).read_text(encoding="utf-8")
    if CONFIG_MARKER not in template or DEPENDENCIES_MARKER not in template:
        raise RuntimeError(f"template {method.template} lacks its CONFIG or dependencies marker")
    pins = pinned_dependencies(optional_packages(config))
    deps = "# dependencies = [\n" + "".join(f'#   "{d}",\n' for d in pins) + "# ]"
    if config.get("rewards"):  # the script imports them from finetune_rewards/: CONFIG names them
        config = {**config, "rewards": reward_modules(config["rewards"])[0]}
    body = "CONFIG: dict = " + pprint.pformat(config, sort_dicts=False, width=100)
    return template.replace(DEPENDENCIES_MARKER, deps).replace(CONFIG_MARKER, body)


def script_files(method: MethodDefinition, config: dict[str, Any]) -> dict[str, str]:
    """Every file of the script, by its name in the run folder: the siblings and reward modules
    it imports, then train.py."""
    files = {name: (TEMPLATES / name).read_text(encoding="utf-8") for name in SIBLINGS}
    files.update(reward_modules(config.get("rewards") or [])[1])
    files["train.py"] = render_script(method, config)
    for name, source in files.items():
        compile(source, name, "exec")  # a template bug fails here, not on the job runner
    return files


def build_script(method: MethodDefinition, config: dict[str, Any], run_dir: Path) -> TrainingScript:
    """Write the script's files into the run folder, train.py last (a folder with train.py is
    whole); the returned config is the one given (rewards with their source, so a rebuild can
    write them again). sha256 covers every file the script runs with."""
    files = script_files(method, config)
    rewards = {name: text for name, text in files.items() if name.startswith(f"{REWARDS_PACKAGE}/")}
    for name in SIBLINGS:
        write_text(run_dir / name, files[name])
    folder = run_dir / REWARDS_PACKAGE
    if rewards:  # written aside, then swapped in whole
        aside = run_dir / f".{REWARDS_PACKAGE}.tmp"
        shutil.rmtree(aside, ignore_errors=True)
        for name, text in rewards.items():
            write_text(aside / name.split("/", 1)[1], text)
        replace_path(aside, folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a plan that had rewards before
    launch = run_dir / LAUNCH_CONFIG
    if config.get("launch"):
        write_text(launch, render_launch_config(config["launch"]))
    else:
        launch.unlink(missing_ok=True)  # a plan that had several processes before
    path = run_dir / "train.py"
    write_text(path, files["train.py"])
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\n{len(files[name].encode())}\n".encode() + files[name].encode())
    return TrainingScript(
        path=str(path),
        sha256=digest.hexdigest(),
        method=method.name,
        trainer=method.trainer,
        config=config,
        files=["train.py", *(name for name in files if name != "train.py")],
    )
