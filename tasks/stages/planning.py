"""The planning stages as Prefect tasks: validate the dataset, check the reward functions, choose
the hardware, price the run, write the training script. Nothing here is paid for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE

from tasks.core.methods import MethodDefinition
from tasks.core.models import (
    CostEstimate,
    DatasetReport,
    HardwarePlan,
    SplitProbe,
    TrainingScript,
)
from tasks.core.money import usd
from tasks.core.spec import RunSpec
from tasks.data.validate import HeldOut, validate_dataset
from tasks.data.vision import planning_inputs
from tasks.plan.cost import estimate_cost
from tasks.plan.hardware import select_hardware
from tasks.plan.rewards import RewardSource
from tasks.plan.script import build_script
from tasks.stages import artifacts
from tasks.stages.stage import say, stage


@stage(name="validate_dataset", cache_policy=NO_CACHE)
def validate_dataset_task(
    source: str,
    method: MethodDefinition,
    model_path: str,
    max_length: int,
    out_dir: Path,
    split: str,
    columns: dict[str, str],
    chat_template_path: str | None = None,
    conversion: str | None = None,
    held_out: HeldOut | None = None,
) -> DatasetReport:
    tokenizer, inputs = planning_inputs(model_path, chat_template_path)
    report = validate_dataset(
        source, method, tokenizer, max_length, out_dir, split, columns, conversion, held_out, inputs
    )
    from tasks.report.render import length_histogram_png

    png = length_histogram_png(
        report.length_histogram, max_length, out_dir / "token_lengths.png", "token lengths of the training rows"
    )
    artifacts.table(
        artifacts.artifact_key("dataset", Path(out_dir).parent.name),
        [
            {"tokens": f"{lo + 1}-{hi}", "rows": n, "truncated": lo >= max_length}
            for lo, hi, n in report.length_histogram
        ],
        description=f"token lengths per row ({report.rows} rows, max_length {max_length})"
        + (f"; chart: {png}" if png else ""),
    )
    what = "ESTIMATED" if report.token_counts == "estimated" else "measured"
    say(f"dataset ok: {report.rows} rows, format {report.format}, mean {report.tokens.mean} tokens/row ({what})")
    if report.images:
        i = report.images
        say(f"images ok: {i.images} in {i.rows_with_images} rows, {i.tokens_per_image_mean} tokens each on average")
    return report


@stage(name="check_rewards", cache_policy=NO_CACHE)
def check_rewards_task(
    names: list[str], report: DatasetReport, pending: frozenset[str] = frozenset()
) -> list[RewardSource]:
    """GRPO, RLOO: resolve the spec's rewards and call each on real rows before any spend (a
    reward model an earlier recipe stage has yet to train is checked when this stage starts)."""

    from tasks.plan.rewards import check_rewards, resolve_rewards

    rewards = resolve_rewards(names, pending)
    rows = [json.loads(line) for line in Path(report.prepared_path).read_text().splitlines()[:4] if line.strip()]
    check_rewards(rewards, rows)
    later = [src.name for fn, src in rewards if fn is None]
    say(
        f"rewards ok: {', '.join(src.name for fn, src in rewards if fn is not None) or 'none yet'}"
        + (f"; checked when their stage has trained them: {', '.join(later)}" if later else "")
    )
    return [src for _, src in rewards]


@stage(name="select_hardware", cache_policy=NO_CACHE)
def select_hardware_task(
    spec: RunSpec,
    model_path: str,
    training_args: dict[str, Any],
    report: DatasetReport,
    probe: SplitProbe | None = None,
) -> HardwarePlan:
    from tasks.core.model_source import load_config

    plan, _ = select_hardware(spec, load_config(model_path), training_args, report, probe=probe)
    say(f"hardware: {plan.description}; {plan.mode}; peak ~{plan.estimated_peak_memory_gb:.2f} GB")
    if probe is not None and probe.rates:
        say(f"batch split: {plan.batch_reason}")
    return plan


@stage(name="probe_splits", cache_policy=NO_CACHE)
def probe_splits_task(
    spec: RunSpec,
    config: dict[str, Any],
    method: MethodDefinition,
    plan: HardwarePlan,
    report: DatasetReport,
    run_dir: Path,
) -> SplitProbe | None:
    """Time the candidate batch splits here with the script's own probe (tasks/plan/probe.py);
    None where the split is not probed."""
    from tasks.core.model_source import load_config
    from tasks.plan.cost import estimate_cost
    from tasks.plan.probe import affordable, candidates, probe_splits, why_not

    if why_not(spec, plan, report):
        return None
    modelled = estimate_cost(spec, load_config(config["model"]), plan, report, config["training"])
    found, too_long = affordable(candidates(plan, config["vision"]), modelled)
    if not found:
        say(f"batch split: not timed, {too_long}")
        return SplitProbe(note=too_long)
    build_script(method, config, run_dir)  # the probe imports train.py; the final script replaces it
    probe = probe_splits(run_dir, config, found)
    timed = ", ".join(f"{r.label}: {r.real_tokens_per_s:,.0f} real tokens/s" for r in probe.rates)
    say(
        f"batch splits timed here{' (cached)' if probe.cached else f' in {probe.seconds:.0f} s'}: {timed or probe.note}"
    )
    return probe


@stage(name="estimate_cost", cache_policy=NO_CACHE)
def estimate_cost_task(
    spec: RunSpec, model_path: str, plan: HardwarePlan, report: DatasetReport, training_args: dict[str, Any]
) -> CostEstimate:
    from tasks.core.model_source import load_config

    cost = estimate_cost(spec, load_config(model_path), plan, report, training_args)
    say(f"estimate: {cost.hours * 60:.1f} min, {usd(cost.usd)} (range {usd(cost.usd_low)}-{usd(cost.usd_high)})")
    return cost


@stage(name="build_script", cache_policy=NO_CACHE)
def build_script_task(method: MethodDefinition, config: dict[str, Any], run_dir: Path) -> TrainingScript:
    script = build_script(method, config, run_dir)
    folder = Path(script.path).parent
    sources = "".join(f"\n\n## `{name}`\n\n```python\n{(folder / name).read_text()}\n```" for name in script.files)
    artifacts.markdown(
        artifacts.artifact_key("script", config["run_name"]),
        f"# Training script `{script.path}`\n\nsha256 `{script.sha256}` (of its files: "
        f"{', '.join(f'`{name}`' for name in script.files)}){sources}",
        description="the generated, self-contained training script and the files it imports",
    )
    return script
