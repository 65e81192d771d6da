"""The before/after comparison and its verdict, from the per-row numbers the training script
measured on the held-out rows (the same rows, tokenizer and template for both models).

Each method's definition names its measure, one primary score per row, oriented so that higher
is better:
- completion_loss (SFT): minus the completion's mean token loss (perplexity is its exponential);
- preference_margin (DPO, ORPO): the log-probability margin of the chosen answer over the rejected one;
- label_likelihood (KTO): a desirable answer's summed log-probability, minus an undesirable one's;
- pair_accuracy (reward models): 1 when the model scores the chosen answer above the rejected one, else 0;
- rewards (GRPO): the sum of the reward functions' scores for a greedy completion.
The change is the mean over rows of (trained - base); its noise band is `sigmas` standard
errors of that mean (rows paired, so what varies from row to row cancels). Beyond the band
the verdict is improved or worse; within it, no change.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from tasks.core.methods import method_definition
from tasks.core.models import EvaluationResult, GenerationPair, MetricComparison, TaskComparison, Verdict
from tasks.evaluate.harness import compare_task


class EvaluationError(ValueError):
    """The script's evaluation record cannot be read."""


def _primary(measure: str, row: dict[str, Any]) -> float | None:
    if measure == "completion_loss":
        return None if row.get("loss") is None else -float(row["loss"])
    if measure == "preference_margin":
        return float(row["margin"])
    if measure == "label_likelihood":
        return float(row["logp"]) if row["label"] else -float(row["logp"])
    if measure == "pair_accuracy":
        return float(row["chosen"] > row["rejected"])
    greedy = [v for k, v in row.items() if k.endswith("/greedy")]
    return None if not greedy or any(v is None for v in greedy) else float(sum(greedy))


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _metrics(measure: str, before: list[dict], after: list[dict]) -> tuple[str, list[MetricComparison]]:
    if measure == "completion_loss":

        def weighted(rows: list[dict]) -> float | None:
            counted = [(r["loss"], r["tokens"]) for r in rows if r.get("loss") is not None and r.get("tokens")]
            total = sum(n for _, n in counted)
            return sum(loss * n for loss, n in counted) / total if total else None

        b, a = weighted(before), weighted(after)
        return "completion log-likelihood per token (mean over rows)", [
            MetricComparison(name="completion loss per token (tokens pooled)", base=b, trained=a, better="lower"),
            MetricComparison(
                name="perplexity",
                base=math.exp(b) if b is not None else None,
                trained=math.exp(a) if a is not None else None,
                better="lower",
            ),
        ]
    if measure == "preference_margin":
        return "chosen-over-rejected log-probability margin", [
            MetricComparison(
                name="preference accuracy",
                base=_mean([float(r["margin"] > 0) for r in before]),
                trained=_mean([float(r["margin"] > 0) for r in after]),
                better="higher",
            ),
            MetricComparison(
                name="mean margin (log-prob)",
                base=_mean([r["margin"] for r in before]),
                trained=_mean([r["margin"] for r in after]),
                better="higher",
            ),
        ]
    if measure == "label_likelihood":
        return "label-signed answer log-probability (desirable up, undesirable down)", _labelled(before, after)
    if measure == "pair_accuracy":
        return "held-out pair accuracy (the chosen answer scored above the rejected one)", [
            MetricComparison(
                name="mean score margin (chosen - rejected)",
                base=_mean([r["chosen"] - r["rejected"] for r in before]),
                trained=_mean([r["chosen"] - r["rejected"] for r in after]),
                better="higher",
            )
        ]
    names = sorted({k for r in before + after for k in r})
    return "sum of greedy rewards", [
        MetricComparison(
            name=f"{name} (mean)",
            base=_mean([r[name] for r in before if r.get(name) is not None]),
            trained=_mean([r[name] for r in after if r.get(name) is not None]),
            better="higher",
        )
        for name in names
    ]


def _labelled(before: list[dict], after: list[dict]) -> list[MetricComparison]:
    """KTO's rows, desirable and undesirable apart: the first should rise, the second fall."""

    def mean_logp(rows: list[dict], label: bool) -> float | None:
        return _mean([float(r["logp"]) for r in rows if r["label"] is label])

    return [
        MetricComparison(
            name="desirable answers' log-probability (mean)",
            base=mean_logp(before, True),
            trained=mean_logp(after, True),
            better="higher",
        ),
        MetricComparison(
            name="undesirable answers' log-probability (mean)",
            base=mean_logp(before, False),
            trained=mean_logp(after, False),
            better="lower",
        ),
    ]


def judge(method: str, record: dict[str, Any], sigmas: float = 2.0) -> EvaluationResult:
    """The comparison from train_result.json's `evaluation` record."""
    measure = method_definition(method).measure
    try:
        before, after = record["before"]["per_row"], record["after"]["per_row"]
    except (KeyError, TypeError) as e:
        raise EvaluationError(f"the evaluation record lacks {e}: the job did not evaluate both models") from None
    if len(before) != len(after):
        raise EvaluationError(f"{len(before)} base rows but {len(after)} trained rows: not the same held-out rows")
    pairs = [
        (b, a)
        for b, a in ((_primary(measure, rb), _primary(measure, ra)) for rb, ra in zip(before, after, strict=True))
        if b is not None and a is not None
    ]
    # a trained model whose scores are NaN or infinite (a diverged run) is worse on those rows,
    # whatever the finite rows say; the numbers are then those of the rows both scored finitely
    broken = sum(1 for b, a in pairs if math.isfinite(b) and not math.isfinite(a))
    pairs = [(b, a) for b, a in pairs if math.isfinite(b) and math.isfinite(a)]
    if not pairs and not broken:
        raise EvaluationError("no held-out row could be scored by both models")
    rows = len(pairs) + broken
    if not pairs:  # every row broken: nothing finite to average
        pairs = [(0.0, 0.0)]
    changes = [a - b for b, a in pairs]
    change = statistics.fmean(changes)
    band = sigmas * statistics.stdev(changes) / math.sqrt(len(changes)) if len(changes) > 1 else 0.0
    verdict: Verdict = "improved" if change > band else "worse" if change < -band else "no change"
    base_score = statistics.fmean(b for b, _ in pairs)
    relative = max(-1e6, min(1e6, change / max(abs(base_score), 1e-6)))
    if broken:
        verdict, relative = "worse", -1.0
    primary, metrics = _metrics(measure, before, after)
    generations = [
        GenerationPair(prompt=g["prompt"], base=g["text"], trained=t["text"])
        for g, t in zip(record["before"].get("generations", []), record["after"].get("generations", []), strict=False)
    ]
    return EvaluationResult(
        method=method,
        rows=rows,
        seconds=round(float(record.get("seconds", 0.0)), 2),
        primary=primary,
        base_score=base_score,
        trained_score=statistics.fmean(a for _, a in pairs),
        change=change,
        noise_band=band,
        # relative to the base's score; a base of (nearly) 0 makes any change large, as it should
        relative_change=relative,
        verdict=verdict,
        metrics=metrics,
        generations=generations,
        non_finite_rows=broken,
    )


def blocks_publish(result: EvaluationResult, max_regression: float | None) -> str | None:
    """Why the publish must stop (a regression beyond the spec's threshold, on the held-out rows
    or on a task evaluation, where forgetting shows), or None."""
    if max_regression is None:
        return None
    if result.verdict == "worse" and -result.relative_change > max_regression:
        return (
            f"the trained model is worse than its base: {result.sentence()}; that is {-result.relative_change:.1%} "
            f"worse, beyond evaluation.max_regression {max_regression:.1%}. Nothing was published. Check the data "
            "and the learning rate; to publish anyway set evaluation.max_regression: null (or a larger share)"
        )
    for t in result.tasks:
        drop = -t.change / max(abs(t.base), 1e-6)
        if t.verdict == "worse" and drop > max_regression:
            return (
                f"the trained model is worse than its base on task {t.task}: {t.metric} {t.base:.4g} -> "
                f"{t.trained:.4g} over {t.rows} rows (noise band +-{t.noise_band:.2g}), {drop:.1%} worse, beyond "
                f"evaluation.max_regression {max_regression:.1%}. Nothing was published. To publish anyway set "
                "evaluation.max_regression: null (or a larger share)"
            )
    return None


def judge_tasks(record: dict[str, Any], sigmas: float) -> list[TaskComparison]:
    """Each task evaluation's paired comparison, from the harness's per-row scores."""
    tasks = record.get("tasks") or {}
    before, after = tasks.get("before") or {}, tasks.get("after") or {}
    if set(before) != set(after):
        raise EvaluationError(
            f"task evaluations ran on the base ({sorted(before)}) but not the same on the trained model"
        )
    return [
        compare_task(
            name,
            {
                "metric": before[name]["metric"],
                "before": before[name]["per_row"],
                "after": after[name]["per_row"],
                "higher_is_better": before[name].get("higher_is_better", True),
                "stderr": {"before": before[name].get("stderr"), "after": after[name].get("stderr")},
            },
            sigmas,
        )
        for name in before
    ]


def judge_record(method: str, record: dict[str, Any], sigmas: float = 2.0) -> EvaluationResult:
    """The verdict from the job's evaluation record: on the held-out rows when there were any,
    else on the first task evaluation; the task comparisons are listed either way."""
    tasks = judge_tasks(record, sigmas)
    if record.get("before"):
        return judge(method, record, sigmas).model_copy(update={"tasks": tasks})
    if not tasks:
        raise EvaluationError("the evaluation record has neither held-out rows nor task evaluations")
    first = tasks[0]
    orient = 1.0 if first.higher_is_better else -1.0
    return EvaluationResult(
        method=method,
        rows=first.rows,
        seconds=round(float(record.get("seconds", 0.0)), 2),
        primary=f"{first.task} {first.metric}" + ("" if first.higher_is_better else " (lower is better)"),
        base_score=orient * first.base,
        trained_score=orient * first.trained,
        change=first.change,
        noise_band=first.noise_band,
        relative_change=max(-1e6, min(1e6, first.change / max(abs(first.base), 1e-6))),
        verdict=first.verdict,
        metrics=[
            MetricComparison(
                name=f"{t.task} {t.metric}",
                base=t.base,
                trained=t.trained,
                better="higher" if t.higher_is_better else "lower",
            )
            for t in tasks
        ],
        tasks=tasks,
    )


def evaluate(run_dir: Path, method: str, sigmas: float, baseline_model: str | None = None) -> EvaluationResult | None:
    """The before/after verdict from what the job measured, or None when no row was held out;
    with the same verdict against the baseline model when the job scored one (a recipe's base)."""
    result = json.loads((run_dir / "train_result.json").read_text())
    record = result.get("evaluation")
    if not record:
        return None
    found = judge_record(method, record, sigmas)
    if record.get("baseline"):
        versus = judge(method, {"before": record["baseline"], "after": record["after"]}, sigmas)
        found = found.model_copy(update={"baseline": versus, "baseline_model": baseline_model})
    return found
