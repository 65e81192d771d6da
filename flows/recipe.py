"""The recipe flow: stages in order, each a child flow run of its method's lifecycle.

    python -m flows.recipe --spec examples/grpo-tiny.yaml [--dry-run] [--json]

Every stage is planned before the first one starts, so a chain whose estimates together pass
`budget.max_usd` is refused before anything is spent. Each stage then runs as its own flow
run (own plan, approval, evaluation and report) from the model the stage before made, with
what is left of the shared budget; the recipe's report shows the chain with every verdict.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from flows.planning import plan_run
from tasks.core.atomic import write_text
from tasks.core.errors import UserFacingError, quiet_refusals
from tasks.core.methods import method_definition
from tasks.core.models import RecipeStageResult, RecipeSummary, RunPlan, RunSummary
from tasks.core.money import usd
from tasks.core.recipe import (
    MAX_RECIPE_NAME,
    RecipeSpec,
    chained_stage,
    chat_model_from,
    default_recipe_name,
    stage_reward_folders,
)
from tasks.core.rundir import runs_root
from tasks.core.spec import RUN_NAME_PATTERN
from tasks.report.recipe import recipe_markdown
from tasks.stages import artifacts
from tasks.stages.approval import BudgetExceeded

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
quiet_refusals()


def method_flow(method: str) -> Any:
    """The method's flow, `flows/<method>.py`'s variable of the same name."""
    import importlib

    return getattr(importlib.import_module(f"flows.{method}"), method)


def plan_stages(recipe: RecipeSpec, name: str) -> list[RunPlan]:
    """Every stage's plan, before anything runs. A later stage's starting model does not exist
    yet: it is planned with the recipe's base, which has the same architecture."""
    from tasks.core.locks import run_lock

    plans = []
    for i in range(len(recipe.stages)):
        spec = chained_stage(recipe, name, i, recipe.model, 0.0)
        pending = frozenset(stage_reward_folders(recipe, name, i).values())  # trained by an earlier stage first
        try:
            with run_lock(str(spec.name)):  # a plan rewrites the stage's run folder
                plan = plan_run(spec, pending_rewards=pending)
        except UserFacingError as e:  # the same refusal, saying which stage it is about
            e.args = (f"stage '{recipe.stages[i].name}' ({spec.method}): {e}", *e.args[1:])
            raise
        start = chat_model_from(recipe, i)
        if start is not None:
            note = (
                f"starts from the model stage '{recipe.stages[start].name}' trains; planned with the recipe's base "
                f"{recipe.model} (the same architecture), so sizes and costs hold"
            )
            plan = plan.model_copy(update={"notes": [note, *plan.notes]})
        plans.append(plan)
    return plans


def check_total(recipe: RecipeSpec, plans: list[RunPlan]) -> None:
    total = sum(p.cost.usd for p in plans)
    if total > recipe.budget.max_usd:
        parts = ", ".join(f"{s.name} {usd(p.cost.usd)}" for s, p in zip(recipe.stages, plans, strict=True))
        raise BudgetExceeded(
            f"the recipe's stages are estimated at {usd(total)} together ({parts}), above budget.max_usd "
            f"{usd(recipe.budget.max_usd)}; nothing was started. Raise max_usd, shorten a stage, or pick cheaper hardware"
        )


def planned_stage(recipe: RecipeSpec, name: str, i: int, plan: RunPlan) -> RecipeStageResult:
    stage, start = recipe.stages[i], chat_model_from(recipe, i)
    return RecipeStageResult(
        stage=str(stage.name),
        method=stage.method,
        run_name=plan.run_name,
        started_from=recipe.model if start is None else f"stage {recipe.stages[start].name}",
        status="planned",
        estimated_usd=plan.cost.usd,
        estimated_usd_high=plan.cost.usd_high,
        detail=f"planned on {plan.hardware.description}, ~{plan.cost.hours * 60:.1f} min; plan in "
        f"{Path(plan.run_dir) / 'plan.json'}",
    )


def finished_stage(planned: RecipeStageResult, summary: RunSummary, started_from: str) -> RecipeStageResult:
    reused = any(s.stage == "submit_job" and s.status == "cached" for s in summary.stages)
    return planned.model_copy(
        update={
            "status": "passed",
            "started_from": started_from,
            "spent_usd": 0.0 if reused or summary.job is None else summary.job.cost_usd,
            "paid_before": reused,
            "evaluation": summary.evaluation,
            "detail": "",
            "model_dir": summary.result.model_dir if summary.result else None,
            "report": str(Path(summary.run_dir) / "report.md"),
        }
    )


def failed_stage(planned: RecipeStageResult, error: Exception, started_from: str) -> RecipeStageResult:
    """A stage that raised: what it spent and how it ended, from its own report when it wrote one."""
    report = runs_root() / planned.run_name / "report.json"
    spent, evaluation = 0.0, None
    if report.exists():
        try:
            summary = RunSummary.model_validate_json(report.read_text(encoding="utf-8"))
            spent = summary.job.cost_usd if summary.job else 0.0
            evaluation = summary.evaluation
        except ValueError:  # an older or damaged report: the error message still says what happened
            pass
    return planned.model_copy(
        update={
            "status": "failed",
            "started_from": started_from,
            "spent_usd": spent,
            "evaluation": evaluation,
            "detail": f"{type(error).__name__}: {error}",
            "report": str(report.with_name("report.md")) if report.exists() else None,
        }
    )


def write_summary(summary: RecipeSummary) -> RecipeSummary:
    run_dir = Path(summary.run_dir)
    md = recipe_markdown(summary)
    write_text(run_dir / "report.md", md)
    write_text(run_dir / "report.json", summary.model_dump_json(indent=2))
    artifacts.markdown(artifacts.artifact_key("recipe", summary.recipe_name), md, description="the recipe's chain")
    return summary


def recipe_name_of(recipe: RecipeSpec) -> str:
    """The recipe's name, else the name this flow run was given, else a new default one."""
    if recipe.name:
        return recipe.name
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    current = ctx.flow_run.name if ctx is not None and ctx.flow_run is not None else None
    prefix = default_recipe_name(recipe).rsplit("-", 2)[0] + "-"  # the methods part of a default name
    if current and current.startswith(prefix) and RUN_NAME_PATTERN.match(current) and len(current) <= MAX_RECIPE_NAME:
        return current
    return default_recipe_name(recipe)


def run_recipe(
    recipe: RecipeSpec,
    dry_run: bool = False,
    approval_timeout_s: int = 3600,
    approve_up_to_usd: float | None = None,
) -> RecipeSummary:
    """Plan every stage, refuse a chain over budget, then run the stages in order as child flow
    runs; the first failure (or a regression that stops a publish) stops the chain."""
    from tasks.core.locks import run_lock

    name = recipe_name_of(recipe)
    run_dir = runs_root() / name
    with run_lock(name):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        plans = plan_stages(recipe, name)
        results = [planned_stage(recipe, name, i, p) for i, p in enumerate(plans)]

        def summary(error: str | None = None) -> RecipeSummary:
            return write_summary(chain_summary(recipe, name, run_dir, plans, results, error))

        try:
            check_total(recipe, plans)
        except BudgetExceeded as e:
            summary(str(e))
            raise
        if dry_run:
            return summary()
        model = recipe.model
        for i in range(len(recipe.stages)):
            spent = sum(r.spent_usd for r in results)
            spec = chained_stage(recipe, name, i, model, spent)
            started_from = results[i].started_from
            pre_approved = None if approve_up_to_usd is None else max(0.0, approve_up_to_usd - spent)
            print(
                f"recipe {name}: stage {i + 1}/{len(recipe.stages)} '{spec.name}' ({spec.method}) from {model}; "
                f"{usd(spec.budget.max_usd)} of the budget left"
            )
            try:
                done = method_flow(spec.method)(
                    spec=spec, approval_timeout_s=approval_timeout_s, approve_up_to_usd=pre_approved
                )
            except Exception as e:
                results[i] = failed_stage(results[i], e, started_from)
                results[i + 1 :] = [r.model_copy(update={"status": "not run"}) for r in results[i + 1 :]]
                summary(f"stage {recipe.stages[i].name}: {e}")
                raise
            results[i] = finished_stage(results[i], done, started_from)
            if done.result is None:
                raise RuntimeError(f"stage {recipe.stages[i].name} finished without a trained model")
            if method_definition(spec.method).head == "causal_lm":  # a reward model is scored with, not trained on
                model = done.result.model_dir
        return summary()


def chain_summary(
    recipe: RecipeSpec,
    name: str,
    run_dir: Path,
    plans: list[RunPlan],
    results: list[RecipeStageResult],
    error: str | None,
) -> RecipeSummary:
    """The chain as it stands: every stage's result, the estimate and what was spent."""
    last = results[-1]
    return RecipeSummary(
        recipe_name=name,
        run_dir=str(run_dir),
        base_model=recipe.model,
        max_usd=recipe.budget.max_usd,
        auto_approve_usd=recipe.budget.auto_approve_usd,
        estimated_usd=sum(p.cost.usd for p in plans),
        estimated_usd_high=sum(p.cost.usd_high for p in plans),
        spent_usd=sum(r.spent_usd for r in results),
        stages=results,
        final_model=last.model_dir if last.status == "passed" else None,
        published=recipe.stages[-1].outputs.hub_repo if last.status == "passed" else None,
        error=error,
    )


def recipe_run_name() -> str:
    from prefect.runtime import flow_run

    recipe = flow_run.parameters.get("recipe")
    try:
        recipe = recipe if isinstance(recipe, RecipeSpec) else RecipeSpec.model_validate(recipe)
    except Exception:  # the flow itself reports a bad recipe
        return f"recipe-{datetime.now():%Y%m%d-%H%M%S}"
    return recipe.name or default_recipe_name(recipe)


@flow(
    name="recipe",
    flow_run_name=recipe_run_name,
    log_prints=True,
    description="Stages in order (e.g. SFT then GRPO), each from the model of the stage before, one budget.",
)
def recipe_flow(
    recipe: RecipeSpec,
    dry_run: bool = False,
    approval_timeout_s: int = 3600,
    approve_up_to_usd: float | None = None,
) -> RecipeSummary:
    """Each stage pauses for approval above what is left of the recipe's auto_approve_usd;
    approve_up_to_usd pre-approves the whole chain up to that amount."""
    return run_recipe(recipe, dry_run, approval_timeout_s, approve_up_to_usd)


if __name__ == "__main__":
    from cli.recipe import main

    sys.exit(main(recipe_flow))
