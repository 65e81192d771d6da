"""The before/after verdict in words and tables, for the report and the model card."""

from __future__ import annotations

from tasks.core.models import EvaluationResult


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _relative(e: EvaluationResult) -> str:
    """The change as a share of the base's score; none where the base scored (about) 0."""
    return "" if abs(e.base_score) < 1e-9 else f" ({e.relative_change:+.1%})"


def evaluation_lines(e: EvaluationResult) -> list[str]:
    """The verdict, the numbers behind it, and a few answers of both models side by side."""
    lines = [
        f"**Verdict: {e.verdict}.** {e.primary}: base {e.base_score:.4g}, trained {e.trained_score:.4g}; mean "
        f"paired change {e.change:+.4g}{_relative(e)}, noise band +-{e.noise_band:.2g} "
        f"({e.rows} held-out rows, the same tokenizer and template for both models; evaluated in {e.seconds:.0f} s).",
        "",
        "| metric | base | trained | better |",
        "|---|---|---|---|",
        *(f"| {m.name} | {_cell(m.base)} | {_cell(m.trained)} | {m.better} |" for m in e.metrics),
    ]
    if e.tasks:
        lines += [
            "",
            "Task evaluations (EleutherAI's lm-evaluation-harness, on the spec's local data files; rows paired):",
            "",
            "| task | metric | rows | base | trained | change | noise band | verdict |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {t.task} | {t.metric}{'' if t.higher_is_better else ' (lower is better)'} | {t.rows} | "
                f"{t.base:.4g} | {t.trained:.4g} | {t.change:+.4g} | +-{t.noise_band:.2g} | {t.verdict} |"
                for t in e.tasks
            ),
        ]
    b = e.baseline
    if b is not None:
        lines += [
            "",
            f"**Against the baseline {e.baseline_model or ''}** (where the recipe began), on the same rows: "
            f"**{b.verdict}**; {b.primary} {b.base_score:.4g} -> {b.trained_score:.4g}, change {b.change:+.4g}, "
            f"noise band +-{b.noise_band:.2g}.",
            "",
            "| metric | baseline | trained |",
            "|---|---|---|",
            *(f"| {m.name} | {_cell(m.base)} | {_cell(m.trained)} |" for m in b.metrics),
        ]
    if e.generations:
        # answers are free text of any length: a list wraps where a table cell would run off the page
        lines += ["", "Held-out prompts answered by both models:"]
        for n, g in enumerate(e.generations, 1):
            prompt, base, trained = (
                " ".join(x.split())[-300:].replace("`", "'") for x in (g.prompt, g.base, g.trained)
            )
            lines += ["", f"{n}. prompt: `{prompt}`", f"   - base model: `{base}`", f"   - trained model: `{trained}`"]
    return lines
