"""Planning, the first part of every lifecycle: validate the data, check the rewards, choose the
hardware, price the run, write the script. `--dry-run` is this and nothing more.

Each stage is a Prefect task inside a flow run and its plain function outside one
(`tasks/stages/stage.py`), so a dry run on the command line needs no Prefect server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.atomic import write_text
from tasks.core.methods import (
    MethodDefinition,
    base_arguments,
    check_training_keys,
    cut_length,
    method_definition,
    outputs_for_method,
)
from tasks.core.model_source import baseline_path, context_length, is_vision_model, load_config, resolve_model
from tasks.core.models import CostEstimate, DatasetReport, HardwarePlan, InputUpload, RunPlan
from tasks.core.rundir import default_run_name, prepare_run_dir
from tasks.core.spec import RunSpec, SpecError, backend_settings
from tasks.data.evaluation import has_evaluation_set, is_conversational, with_evaluation_rows
from tasks.data.validate import HeldOut
from tasks.evaluate.harness import HarnessTask, harness_tasks
from tasks.export.gguf import check_converter_knows, check_quant_types, config_row_sizes
from tasks.export.hub import publish_target
from tasks.plan.cost import planned_arguments
from tasks.plan.flavors import LOCAL_FLAVORS
from tasks.plan.rewards import check_reward_models_reachable
from tasks.plan.script import script_config
from tasks.run.backends import Backend, get_backend
from tasks.stages.planning import (
    build_script_task,
    check_rewards_task,
    estimate_cost_task,
    probe_splits_task,
    select_hardware_task,
    validate_dataset_task,
)


def plan_run(spec: RunSpec, runs_root: Path | None = None, pending_rewards: frozenset[str] = frozenset()) -> RunPlan:
    """Validate, size, price and script the run; nothing is submitted. Written to plan.json."""
    method = method_definition(spec.method)
    spec = outputs_for_method(spec)
    check_training_keys(spec)
    run_name = spec.name or default_run_name(spec)
    run_dir = prepare_run_dir(spec, run_name, runs_root)
    model_path = resolve_model(spec.model)
    args = base_arguments(method, spec.training)
    report = validate(spec, method, model_path, args, run_dir)
    rewards = check_rewards_task(spec.rewards, report, pending_rewards) if method.rewards else []
    hardware = select_hardware_task(spec, model_path, args, report)
    vision = is_vision_model(load_config(model_path))
    probed = script_config(spec, method, run_name, model_path, hardware, planned_arguments(args, hardware), vision)
    if probe := probe_splits_task(spec, probed, method, hardware, report, run_dir):
        hardware = select_hardware_task(spec, model_path, args, report, probe)
    notes = gguf_notes(spec, model_path)
    cost = estimate_cost_task(spec, model_path, hardware, report, args)
    args = planned_arguments(args, hardware)
    on_gpu = hardware.accelerator is not None and hardware.accelerator_count > 0
    if args.get("use_vllm") and not on_gpu:
        raise SpecError("training.use_vllm needs a CUDA GPU, and this run is placed on a CPU; drop it or use a GPU")
    backend = get_backend(spec.backend, backend_settings(spec))
    check_reward_models_reachable(rewards, spec.backend, backend.on_this_machine)
    baseline = baseline_path(spec, model_path, report.heldout_rows)
    eval_tasks = harness_tasks(spec, run_dir, backend.on_this_machine)
    config = script_config(spec, method, run_name, backend.model_reference(model_path), hardware, args, vision)
    config = job_settings(config, spec, backend, rewards, baseline, eval_tasks, report, yardstick(cost, hardware))
    script = build_script_task(method, config, run_dir)
    inputs = backend.planned_inputs(run_dir, model_path, baseline)
    plan = RunPlan(
        run_name=run_name,
        run_dir=str(run_dir),
        method=spec.method,
        model=spec.model,
        model_path=model_path,
        baseline_path=baseline,
        eval_tasks=eval_tasks,
        dataset=report,
        hardware=hardware,
        cost=with_upload(cost, inputs),
        script=script,
        inputs=inputs,
        notes=notes,
        trackio={"project": run_name, "run": run_name, "dir": str(run_dir / "trackio")},
    )
    write_text(run_dir / "plan.json", plan.model_dump_json(indent=2))
    return plan


def validate(
    spec: RunSpec, method: MethodDefinition, model_path: str, args: dict[str, Any], run_dir: Path
) -> DatasetReport:
    """The training rows checked and prepared, with the rows held out for evaluation (or the
    spec's own evaluation set)."""
    report = validate_dataset_task(
        spec.dataset,
        method,
        model_path,
        cut_length(args, context_length(load_config(model_path))),
        run_dir / "data",
        spec.split,
        dict(spec.columns),
        args.get("chat_template_path"),
        spec.conversion,
        HeldOut(
            share=0 if has_evaluation_set(spec) else spec.evaluation.held_out,
            maximum=spec.evaluation.held_out_max,
            seed=spec.seed,
        ),
    )
    return with_evaluation_rows(spec, method, model_path, report, args) if has_evaluation_set(spec) else report


def job_settings(
    config: dict[str, Any],
    spec: RunSpec,
    backend: Backend,
    rewards: list[Any],
    baseline: str | None,
    eval_tasks: list[HarnessTask],
    report: DatasetReport,
    measure_by: dict[str, float] | None,
) -> dict[str, Any]:
    """What the script needs beyond training: where it pushes, its rewards, what it compares with,
    and what its pace is measured against."""
    config = {**config, "evaluation": dict(config["evaluation"])}
    if measure_by:
        config["yardstick"] = measure_by
    if spec.outputs.hub_repo and publish_target(spec.outputs.hub_repo)[0] == "hub" and not backend.on_this_machine:
        config["push_model_to"] = spec.outputs.hub_repo  # the job pushes the trained model there itself
        config["private"] = spec.outputs.private
    if rewards:
        config["rewards"] = [r.model_dump() for r in rewards]
    if baseline is not None:
        config["evaluation"]["baseline"] = backend.model_reference(baseline, slot="baseline")
    if eval_tasks:
        config["evaluation"]["tasks"] = [{"name": t.name, "metric": t.metric, "config": t.config} for t in eval_tasks]
        # chat models are asked in their own template, as they were trained
        config["evaluation"]["chat_template"] = is_conversational(report)
    return config


def yardstick(cost: CostEstimate, hardware: HardwarePlan) -> dict[str, float] | None:
    """The useful FLOPs of a real token, and a cloud flavor's dense peak (this machine's is measured
    by the script itself: a figure measured at planning would make each plan's script differ, and a
    re-plan of a running job would set its checkpoints aside as made from other inputs)."""
    if not cost.useful_flops_per_token:
        return None
    found = {"useful_flops_per_token": cost.useful_flops_per_token}
    if hardware.flavor not in LOCAL_FLAVORS and cost.peak_flops:
        found["peak_flops"] = cost.peak_flops
    return found


def with_upload(cost: CostEstimate, inputs: InputUpload | None) -> CostEstimate:
    """The estimate with the time to upload the job's inputs first, where the backend uploads."""
    if inputs is None:
        return cost
    return cost.model_copy(
        update={"upload_s": inputs.seconds, "basis": cost.basis + f"; upload of inputs ~{inputs.seconds:.0f} s first"}
    )


def gguf_notes(spec: RunSpec, model_path: str) -> list[str]:
    """What the plan says ahead about GGUF export of this architecture and quant types."""
    if method_definition(spec.method).no_gguf:
        return [f"no GGUF files: {method_definition(spec.method).no_gguf}"]
    config = load_config(model_path)
    types = list(spec.outputs.gguf)
    return check_converter_knows(config, types) + check_quant_types(
        config_row_sizes(config), types, strict=spec.outputs.gguf_strict
    )
