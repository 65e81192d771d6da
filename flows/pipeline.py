"""The lifecycle shared by every method: plan, approve, train, fetch, convert, publish, report.

`plan_run` is used both inside the flows (each stage a Prefect task) and directly by
`--dry-run`, which needs no Prefect server: `under_prefect=False` calls the stages' plain
functions.
"""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tasks import artifacts
from tasks.approval import request_approval, request_publish_decision
from tasks.atomic import write_text
from tasks.cache import (
    call_cached,
    gguf_key,
    gguf_problems,
    publish_key,
    published_problems,
    run_cached,
    smoke_key,
    trusted_result,
)
from tasks.data.validate import HeldOut
from tasks.errors import error_payload
from tasks.evaluate.harness import HarnessTask, check_with_harness, prepare_tasks
from tasks.evaluate.verdict import blocks_publish
from tasks.gguf import check_converter_knows, check_quant_types, config_row_sizes
from tasks.hub import publish_target
from tasks.methods import base_arguments, cut_length, method_definition, planned_arguments, unknown_training_keys
from tasks.model_source import context_length, load_config, resolve_model
from tasks.models import CostEstimate, RunPlan, RunSummary, StageOutcome
from tasks.money import usd
from tasks.report import plan_markdown, summary_markdown
from tasks.run.backends import Account, get_backend
from tasks.run.training import TrainingFailed, trained_problems, training_key
from tasks.rundir import default_run_name, prepare_run_dir
from tasks.script import script_config
from tasks.spec import RUN_NAME_PATTERN, RunSpec, SpecError
from tasks.stages import _log as log_stage
from tasks.stages import (
    build_script_task,
    check_account_task,
    check_rewards_task,
    convert_gguf_task,
    estimate_cost_task,
    evaluate_task,
    push_to_hub_task,
    select_hardware_task,
    smoke_test_gguf_task,
    train_task,
    validate_dataset_task,
)

SECRET_LIKE = ("token", "password", "secret", "api_key")
PLAN_STAGES = ("validate_dataset", "select_hardware", "estimate_cost", "build_script")
RUN_STAGES = (
    "check_account",
    "approve",
    "submit_job",
    "monitor",
    "fetch_artifacts",
    "evaluate",
    "convert_gguf",
    "smoke_test_gguf",
    "push_to_hub",
)


def _check_training_keys(spec: RunSpec) -> None:
    method = method_definition(spec.method)
    secrets = [k for k in spec.training if any(s in k.lower() for s in SECRET_LIKE)]
    if secrets:
        raise SpecError(
            f"training.{secrets[0]} looks like a secret; secrets never go into the spec or the script. "
            "Set HF_TOKEN in the environment (or a Prefect Secret block) instead."
        )
    unknown = unknown_training_keys(method, list(spec.training))
    if unknown:
        parts = [
            f"'{k}'" + (f" (did you mean {', '.join(repr(m) for m in near)}?)" if near else "")
            for k, near in unknown.items()
        ]
        raise SpecError(f"training: unknown {method.config_class} option(s): {', '.join(parts)}")


def separate_evaluation(spec: RunSpec) -> bool:
    return bool(spec.evaluation.dataset or spec.evaluation.split)


def evaluation_rows(spec: RunSpec, method: Any, model_path: str, report: Any, args: dict[str, Any]) -> Any:
    """The evaluation rows from the spec's evaluation dataset or split, checked like the training
    rows (same format, columns and conversion) and sampled with the spec's seed."""
    import random

    from tasks.data.validate import validate_dataset
    from tasks.stages import planning_tokenizer

    source = spec.evaluation.dataset or spec.dataset
    split = spec.evaluation.split or "train"
    out = Path(report.prepared_path).parent
    checked = validate_dataset(
        source,
        method,
        planning_tokenizer(model_path, args.get("chat_template_path")),
        report.max_length,
        out / "evaluation",
        split,
        dict(spec.columns),
        spec.conversion,
        HeldOut(share=0),
    )
    lines = Path(checked.prepared_path).read_text(encoding="utf-8").splitlines()
    keep = sorted(random.Random(spec.seed).sample(range(len(lines)), min(len(lines), spec.evaluation.held_out_max)))
    write_text(Path(report.heldout_path), "".join(lines[i] + "\n" for i in keep))
    where = f"{source} (split {split})"
    return report.model_copy(
        update={
            "heldout_rows": len(keep),
            "heldout_source": f"{len(keep)} of the {len(lines)} rows of {where}, chosen with seed {spec.seed}",
            "warnings": [*report.warnings, f"evaluation rows: {len(keep)} of {len(lines)} from {where}"],
        }
    )


def baseline_path(spec: RunSpec, model_path: str, heldout_rows: int) -> str | None:
    """The model the trained one is also compared with (a recipe's base), when it is not the
    model this run starts from and there are rows to compare on."""
    if spec.evaluation.baseline is None or heldout_rows == 0:
        return None
    path = resolve_model(spec.evaluation.baseline)
    return None if path == model_path else path


def harness_tasks(spec: RunSpec, run_dir: Path, on_this_machine: bool) -> list[HarnessTask]:
    """The spec's task evaluations, checked and their data copied into the run folder; the
    harness renders each task's first row here when it is installed."""
    if not spec.evaluation.tasks:
        return []
    if on_this_machine and importlib.util.find_spec("lm_eval") is None:
        raise SpecError(
            "evaluation.tasks run through lm-evaluation-harness, which is not installed here: "
            "pip install -e '.[eval]' (or pip install lm-eval), or drop evaluation.tasks"
        )
    tasks = prepare_tasks(list(spec.evaluation.tasks), run_dir)
    check_with_harness(tasks, run_dir)
    return tasks


def conversational(report: Any) -> bool:
    if report.format in ("messages", "implicit_preference"):
        return True
    try:
        first = json.loads(Path(report.prepared_path).read_text(encoding="utf-8").split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return isinstance(first.get("prompt"), list)


def plan_run(spec: RunSpec, runs_root: Path | None = None, under_prefect: bool = False) -> RunPlan:
    """Validate, size, price and script the run; nothing is submitted."""

    def stage(t: Any) -> Any:
        return t if under_prefect else t.fn

    method = method_definition(spec.method)
    _check_training_keys(spec)
    run_name = spec.name or default_run_name(spec)
    run_dir = prepare_run_dir(spec, run_name, runs_root)
    notes: list[str] = []
    model_path = resolve_model(spec.model)
    args = base_arguments(method, spec.training)
    report = stage(validate_dataset_task)(
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
            share=0 if separate_evaluation(spec) else spec.evaluation.held_out,
            maximum=spec.evaluation.held_out_max,
            seed=spec.seed,
        ),
    )
    if separate_evaluation(spec):
        report = evaluation_rows(spec, method, model_path, report, args)
    rewards = stage(check_rewards_task)(spec.rewards, report) if spec.method == "grpo" else []
    hardware = stage(select_hardware_task)(spec, model_path, args, report)
    notes += check_converter_knows(load_config(model_path), list(spec.outputs.gguf))
    notes += check_quant_types(
        config_row_sizes(load_config(model_path)), list(spec.outputs.gguf), strict=spec.outputs.gguf_strict
    )
    cost = stage(estimate_cost_task)(spec, model_path, hardware, report, args)
    on_gpu = hardware.accelerator is not None and hardware.accelerator_count > 0
    args = planned_arguments(args, hardware)
    if args.get("use_vllm") and not on_gpu:
        raise SpecError("training.use_vllm needs a CUDA GPU, and this run is placed on a CPU; drop it or use a GPU")
    backend = get_backend(spec.backend, spec.pool)
    config = script_config(spec, method, run_name, backend.model_reference(model_path), hardware, args)
    if spec.outputs.hub_repo and publish_target(spec.outputs.hub_repo)[0] == "hub" and not backend.on_this_machine:
        config["push_model_to"] = spec.outputs.hub_repo  # the job pushes the trained model there itself
        config["private"] = spec.outputs.private
    if rewards:
        config["rewards"] = [r.model_dump() for r in rewards]
    baseline = baseline_path(spec, model_path, report.heldout_rows)
    if baseline is not None:
        config["evaluation"]["baseline"] = backend.model_reference(baseline, slot="baseline")
    eval_tasks = harness_tasks(spec, run_dir, backend.on_this_machine)
    if eval_tasks:
        config["evaluation"]["tasks"] = [{"name": t.name, "metric": t.metric, "config": t.config} for t in eval_tasks]
        # chat models are asked in their own template, as they were trained
        config["evaluation"]["chat_template"] = conversational(report)
    script = stage(build_script_task)(method, config, run_dir)
    inputs = backend.planned_inputs(run_dir, model_path, baseline)
    if inputs is not None:
        cost = cost.model_copy(
            update={
                "upload_s": inputs.seconds,
                "basis": cost.basis + f"; upload of inputs ~{inputs.seconds:.0f} s first",
            }
        )
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
        cost=cost,
        script=script,
        inputs=inputs,
        notes=notes,
        trackio={"project": run_name, "run": run_name, "dir": str(run_dir / "trackio")},
    )
    write_text(run_dir / "plan.json", plan.model_dump_json(indent=2))
    return plan


def _outputs(plan: RunPlan, summary_fields: dict[str, Any]) -> dict[str, str]:
    run_dir = Path(plan.run_dir)
    out = {
        "run folder": str(run_dir),
        "spec": str(run_dir / "spec.yaml"),
        "plan": str(run_dir / "plan.json"),
        "script": plan.script.path,
        "data": plan.dataset.prepared_path,
    }
    if (run_dir / "logs" / "train.log").exists():
        out["log"] = str(run_dir / "logs" / "train.log")
    if (run_dir / "trackio").exists():
        out["metrics"] = str(run_dir / "trackio")
    result = summary_fields.get("result")
    if result is not None:
        out["model"] = result.model_dir
        if result.adapter_dir:
            out["adapter"] = result.adapter_dir
    gguf = summary_fields.get("gguf")
    if gguf is not None and gguf.files:
        out["gguf"] = str(Path(gguf.files[0].path).parent)
    out["report"] = str(run_dir / "report.md")
    return out


def finish(plan: RunPlan, stages: list[StageOutcome], fields: dict[str, Any], error: str | None) -> RunSummary:
    summary = RunSummary(
        run_name=plan.run_name,
        run_dir=plan.run_dir,
        plan=plan,
        stages=stages,
        outputs=_outputs(plan, fields),
        error=error,
        **fields,
    )
    run_dir = Path(plan.run_dir)
    md = summary_markdown(summary)
    write_text(run_dir / "report.md", md)
    write_text(run_dir / "report.json", summary.model_dump_json(indent=2))
    artifacts.markdown(artifacts.artifact_key("report", plan.run_name), md, description="run report")
    return summary


def plan_outcomes(plan: RunPlan) -> list[StageOutcome]:
    d, h, c = plan.dataset, plan.hardware, plan.cost
    details = {
        "validate_dataset": f"{d.rows} rows, format {d.format}, {len(d.warnings)} warning(s)",
        "select_hardware": f"{h.flavor}, LoRA {'on' if h.use_lora else 'off'}, peak ~{h.estimated_peak_memory_gb:.2f} GB",
        "estimate_cost": f"{usd(c.usd)} (range {usd(c.usd_low)}-{usd(c.usd_high)}), ~{c.hours * 60:.1f} min",
        "build_script": plan.script.path,
    }
    return [StageOutcome(stage=s, status="passed", detail=details[s]) for s in PLAN_STAGES]


def run_lifecycle(
    spec: RunSpec,
    dry_run: bool = False,
    approval_timeout_s: int = 3600,
    approve_up_to_usd: float | None = None,
    poll_s: float | None = None,
) -> RunSummary:
    """The whole lifecycle inside a flow run, holding the run's lock (one flow per run
    name). Failures after planning still write the report (every stage with its status)
    before the error propagates."""
    from tasks.run.locks import run_lock

    spec = named(spec)
    with run_lock(str(spec.name)):
        return _run_lifecycle(spec, dry_run, approval_timeout_s, approve_up_to_usd, poll_s)


def named(spec: RunSpec) -> RunSpec:
    """The spec with its run name fixed now (the default one for a spec without a name), so
    that the lock, the run folder and the Prefect flow run all agree on it."""
    if spec.name is not None:
        return spec
    return spec.model_copy(update={"name": _current_flow_run_name(spec) or default_run_name(spec)})


def _run_lifecycle(
    spec: RunSpec,
    dry_run: bool,
    approval_timeout_s: int,
    approve_up_to_usd: float | None,
    poll_s: float | None,
) -> RunSummary:
    plan = plan_run(spec, under_prefect=True)
    stages = plan_outcomes(plan)
    artifacts.markdown(artifacts.artifact_key("plan", plan.run_name), plan_markdown(plan), description="the plan")
    fields: dict[str, Any] = {}
    if dry_run:
        stages += [StageOutcome(stage=s, status="not run", detail="dry run") for s in RUN_STAGES]
        return finish(plan, stages, fields, None)

    run_dir = Path(plan.run_dir)
    say = log_stage
    current = "check_account"
    try:
        if plan.dataset.token_counts == "estimated":
            raise SpecError(
                "this plan's token counts, time and cost are estimates, not measurements: "
                + next((w for w in plan.dataset.warnings if "ESTIMATED" in w), "the tokenizer cannot encode")
                + ". Nothing was submitted; `--dry-run` still shows the estimated plan"
            )
        key = training_key(plan, spec.backend)
        # looked up (and its files hashed) once: the answer decides approval and the call
        done, refresh = trusted_result(run_dir, key, trained_problems, say, "train")
        if done is not None:
            why = f"training with these inputs finished before (job {done.job.job_id}); nothing to submit or pay for"
            stages += [
                StageOutcome(stage="check_account", status="skipped", detail=why),
                StageOutcome(stage="approve", status="skipped", detail=why),
            ]
            cost, approval = plan.cost, None
        else:
            account = check_account_task(spec.backend, plan.hardware.flavor, spec.pool)
            cost = repriced(plan.cost, account.price_per_hour_usd)
            stages.append(StageOutcome(stage="check_account", status="passed", detail=account_detail(account, cost)))
            current = "approve"
            approval = request_approval(
                cost, spec.budget, plan.run_name, run_dir, approval_timeout_s, approve_up_to_usd=approve_up_to_usd
            )
            fields["approval"] = approval
            stages.append(StageOutcome(stage="approve", status="passed", detail=approval.reason))
        current = "submit_job"
        trained, hit = call_cached(train_task, run_dir, key, refresh, spec, plan, cost, approval, poll_s)
        fields["job"], fields["result"] = trained.job, trained.result
        status = "cached" if hit else "passed"
        stages += [
            StageOutcome(stage="submit_job", status=status, detail=trained.submitted),
            StageOutcome(stage="monitor", status=status, detail=trained.job.detail),
            StageOutcome(stage="fetch_artifacts", status=status, detail=trained.result.model_dir),
        ]
        current = "evaluate"
        evaluation = evaluate_task(
            run_dir, spec.method, spec.evaluation.noise_sigmas, plan.run_name, spec.evaluation.baseline
        )
        fields["evaluation"] = evaluation
        if evaluation is None:
            stages.append(StageOutcome(stage="evaluate", status="skipped", detail="no held-out rows"))
        else:
            detail = evaluation.sentence()
            stopped = blocks_publish(evaluation, spec.evaluation.max_regression)
            if stopped:  # a person decides where one can answer; otherwise nothing is published
                detail += "; " + request_publish_decision(stopped, plan.run_name, run_dir, approval_timeout_s)
            stages.append(StageOutcome(stage="evaluate", status="passed", detail=detail))
        current = "convert_gguf"
        gguf, hit = run_cached(
            convert_gguf_task,
            run_dir,
            gguf_key(trained.result, spec.outputs),
            gguf_problems,
            say,
            trained.result,
            spec.outputs,
            run_dir,
            plan.run_name,
        )
        stages.append(cached_outcome(gguf.outcome, hit))
        current = "smoke_test_gguf"
        tested, hit = run_cached(
            smoke_test_gguf_task,
            run_dir,
            smoke_key(gguf, trained.result, plan.dataset, spec.outputs),
            gguf_problems,
            say,
            gguf,
            trained.result,
            plan.dataset,
            plan.run_name,
            spec.outputs,
        )
        fields["gguf"] = tested
        stages.append(cached_outcome(tested.outcome, hit))
        current = "push_to_hub"
        published, hit = run_cached(
            push_to_hub_task,
            run_dir,
            publish_key(spec, trained.job, trained.result, tested),
            published_problems,
            say,
            spec,
            plan,
            trained.job,
            trained.result,
            tested,
            evaluation,
        )
        fields["published"] = published
        stages.append(cached_outcome(published.outcome, hit))
    except Exception as raised:
        e: Exception = raised
        if isinstance(e, TrainingFailed):
            current = e.stage
            if e.job is not None:
                fields["job"] = e.job
            if e.submitted:
                stages.append(StageOutcome(stage="submit_job", status="passed", detail=e.submitted))
            e = e.__cause__ if isinstance(e.__cause__, Exception) else e
        if not stages or stages[-1].stage != current:
            detail = fields["job"].detail if current == "monitor" and "job" in fields else f"{type(e).__name__}: {e}"
            stages.append(StageOutcome(stage=current, status="failed", detail=detail))
        done_stages = {s.stage for s in stages}
        stages += [StageOutcome(stage=s, status="not run") for s in RUN_STAGES if s not in done_stages]
        payload = error_payload(e)
        fields.update(error_code=payload["code"], error_fix=payload["fix"])
        finish(plan, stages, fields, f"{current}: {e}")
        raise e from None
    return finish(plan, stages, fields, None)


def cached_outcome(outcome: StageOutcome, hit: bool) -> StageOutcome:
    """A stage taken from the cache says so, with what it found when it ran."""
    if not hit or outcome.status != "passed":
        return outcome
    return outcome.model_copy(update={"status": "cached", "detail": f"{outcome.detail} (from an earlier run)"})


def repriced(cost: CostEstimate, price_per_hour: float | None) -> CostEstimate:
    """The estimate at the price the backend quotes now (the catalogue's when it does not answer)."""
    if price_per_hour is None or abs(price_per_hour - cost.price_per_hour_usd) < 1e-9:
        return cost
    return cost.model_copy(
        update={
            "price_per_hour_usd": price_per_hour,
            "usd": cost.hours * price_per_hour,
            "usd_low": cost.hours_low * price_per_hour,
            "usd_high": cost.hours_high * price_per_hour,
            "basis": cost.basis + f"; price refreshed to {usd(price_per_hour)}/h",
        }
    )


def account_detail(account: Account, cost: CostEstimate) -> str:
    if account.namespace is None:
        return "this machine: nothing to check"
    return (
        f"namespace {account.namespace}; {cost.flavor} at {usd(cost.price_per_hour_usd)}/h from "
        f"{account.price_source}; estimate {usd(cost.usd)} (up to {usd(cost.usd_high)})"
    )


def plan_json(plan: RunPlan) -> str:
    return json.dumps(plan.model_dump(mode="json"), indent=2)


def _current_flow_run_name(spec: RunSpec) -> str | None:
    """The name `flow_run_name` gave this flow run, when it is a default run name."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    name = ctx.flow_run.name if ctx is not None and ctx.flow_run is not None else None
    return name if name and name.startswith(f"{spec.method}-") and RUN_NAME_PATTERN.match(name) else None


def flow_run_name() -> str:
    """The run's own name in the Prefect UI's runs list (Prefect's random one otherwise)."""
    from prefect.runtime import flow_run

    spec = flow_run.parameters.get("spec")
    try:
        spec = spec if isinstance(spec, RunSpec) else RunSpec.model_validate(spec)
    except Exception:  # the flow itself reports a bad spec
        return f"{flow_run.flow_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return spec.name or default_run_name(spec)


def lifecycle_flow(method: str, description: str) -> Any:
    """The Prefect flow of one method: the same lifecycle, named for the method, with the
    run spec as a typed parameter (a form in the Prefect UI)."""
    from prefect import flow

    from flows.jobs import cancel_job_of_flow_run
    from tasks.errors import quiet_refusals

    quiet_refusals()

    @flow(
        name=method,
        flow_run_name=flow_run_name,
        log_prints=True,
        description=description,
        on_cancellation=[cancel_job_of_flow_run],
    )
    def lifecycle(
        spec: RunSpec, dry_run: bool = False, approval_timeout_s: int = 3600, approve_up_to_usd: float | None = None
    ) -> RunSummary:
        """Above the spec's auto_approve_usd the run pauses for approval (at most
        approval_timeout_s); approve_up_to_usd pre-approves any estimate up to that amount."""
        if spec.method != method:
            raise ValueError(f"the {method} flow got a {spec.method} spec; use python -m flows.{spec.method}")
        return run_lifecycle(
            spec, dry_run=dry_run, approval_timeout_s=approval_timeout_s, approve_up_to_usd=approve_up_to_usd
        )

    return lifecycle
