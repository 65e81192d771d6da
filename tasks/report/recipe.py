"""A recipe's report: the chain, each stage's cost and its verdict against the model it
started from and against the recipe's base."""

from __future__ import annotations

from tasks.core.models import EvaluationResult, RecipeStageResult, RecipeSummary
from tasks.core.money import usd


def _verdict(e: EvaluationResult | None) -> str:
    if e is None:
        return "-"
    return f"{e.verdict} ({e.base_score:.3g} -> {e.trained_score:.3g}, +-{e.noise_band:.2g})"


def _versus_base(s: RecipeStageResult, first: bool) -> str:
    if s.evaluation is None:
        return "-"
    if first:  # the first stage starts from the base: the two verdicts are one
        return "same as its start"
    return _verdict(s.evaluation.baseline) if s.evaluation.baseline is not None else "-"


def _cost(s: RecipeStageResult) -> str:
    planned = f"{usd(s.estimated_usd)} (up to {usd(s.estimated_usd_high)})"
    if s.status == "planned" or s.status == "not run":
        return planned
    spent = "reused an earlier training" if s.paid_before else usd(s.spent_usd)
    return f"{planned}; spent {spent}"


def recipe_markdown(r: RecipeSummary) -> str:
    status = (
        f"FAILED: {r.error}" if r.error else ("planned" if all(s.status == "planned" for s in r.stages) else "done")
    )
    lines = [
        f"# Recipe `{r.recipe_name}`: {status}",
        "",
        f"Starts from **{r.base_model}**; {len(r.stages)} stage(s), each from the model of the stage before. "
        f"One budget: estimated {usd(r.estimated_usd)} (up to {usd(r.estimated_usd_high)}) of max_usd "
        f"{usd(r.max_usd)}, auto-approved up to {usd(r.auto_approve_usd)} in all; spent {usd(r.spent_usd)}.",
        "",
        "| # | stage | method | starts from | status | cost | verdict vs its start | verdict vs the base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(r.stages):
        start = "the base" if i == 0 else f"stage {r.stages[i - 1].stage}"
        lines.append(
            f"| {i + 1} | {s.stage} (`{s.run_name}`) | {s.method} | {start} | {s.status} | {_cost(s)} | "
            f"{_verdict(s.evaluation)} | {_versus_base(s, i == 0)} |"
        )
    details = [f"- stage {s.stage}: {s.detail}" for s in r.stages if s.detail]
    if details:
        lines += ["", *details]
    reports = [f"- {s.stage}: {s.report}" for s in r.stages if s.report]
    if reports:
        lines += ["", "Each stage's own report (plan, training, evaluation, files):", "", *reports]
    if r.final_model:
        lines += ["", f"Final model: {r.final_model}" + (f"; published to {r.published}" if r.published else "")]
    return "\n".join(lines) + "\n"


def recipe_text(r: RecipeSummary) -> str:
    """The console version."""
    planned = all(s.status == "planned" for s in r.stages)
    out = [f"recipe {r.recipe_name}: {'FAILED: ' + r.error if r.error else 'planned (dry run)' if planned else 'done'}"]
    for i, s in enumerate(r.stages):
        line = f"  {i + 1}. {s.stage} ({s.method}, run {s.run_name}): {s.status}, {_cost(s)}"
        if s.evaluation is not None:
            line += f"; {_verdict(s.evaluation)}"
            if i > 0 and s.evaluation.baseline is not None:
                line += f"; against the base: {_verdict(s.evaluation.baseline)}"
        out.append(line)
        if s.detail:
            out.append(f"     {s.detail}")
    out.append(f"  spent {usd(r.spent_usd)} of max_usd {usd(r.max_usd)}")
    if r.final_model:
        out.append(f"  final model: {r.final_model}" + (f" (published to {r.published})" if r.published else ""))
    out.append(f"  report: {r.run_dir}/report.md")
    return "\n".join(out)
