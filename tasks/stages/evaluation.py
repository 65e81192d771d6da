"""The before/after evaluation as a Prefect task: the verdict from what the job measured, as a table."""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import NO_CACHE

from tasks.core.models import (
    EvaluationResult,
)
from tasks.evaluate.verdict import evaluate
from tasks.stages import artifacts
from tasks.stages.stage import say, stage


@stage(name="evaluate", cache_policy=NO_CACHE)  # reads one file the job wrote: nothing to retry or cache
def evaluate_task(
    run_dir: Path, method: str, sigmas: float, run_name: str, baseline_model: str | None = None
) -> EvaluationResult | None:
    found = evaluate(run_dir, method, sigmas, baseline_model)
    if found is None:
        say("evaluate: no held-out rows (under 40 rows and no evaluation.held_out count): skipped")
        return None
    artifacts.table(
        artifacts.artifact_key("evaluation", run_name),
        [
            {
                "metric": m.name,
                "base": None if m.base is None else round(m.base, 4),
                "trained": None if m.trained is None else round(m.trained, 4),
                "better": m.better,
            }
            for m in found.metrics
        ]
        + [
            {
                "metric": f"{t.task} {t.metric} (lm-eval, {t.rows} rows)",
                "base": round(t.base, 4),
                "trained": round(t.trained, 4),
                "better": "higher" if t.higher_is_better else "lower",
            }
            for t in found.tasks
            if not any(m.name == f"{t.task} {t.metric}" for m in found.metrics)
        ],
        description=f"did it help? {found.sentence()}",
    )
    say(f"evaluate: {found.sentence()}")
    if found.baseline is not None:
        say(f"evaluate: against the baseline {baseline_model}: {found.baseline.sentence()}")
    return found
