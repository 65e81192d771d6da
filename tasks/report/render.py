"""The plan and the final report, as markdown (Prefect artifact, report.md) and console text."""

from __future__ import annotations

from pathlib import Path

from tasks.core.models import CostEstimate, DatasetReport, HardwarePlan, RunPlan, RunSummary, TrainingMeasurement
from tasks.core.money import usd
from tasks.evaluate.summary import evaluation_lines
from tasks.export.gguf_summary import fallback_text, gguf_cells
from tasks.plan.flavors import LOCAL_FLAVORS
from tasks.plan.launch import launch_command


def _gb(x: float) -> str:
    return f"{x:.3f} GB" if x < 1 else f"{x:.1f} GB"


def _duration(hours: float) -> str:
    s = hours * 3600
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{hours:.1f} h"


def length_table(bins: list[tuple[int, int, int]], max_length: int) -> list[str]:
    """Token lengths as a markdown table with a bar per bin (rows past max_length are marked)."""
    if not bins:
        return []
    most = max(n for _, _, n in bins) or 1
    rows = ["", "| tokens | rows | |", "|---|---|---|"]
    for lo, hi, n in bins:
        mark = " (truncated)" if lo >= max_length else ""
        rows.append(f"| {lo + 1}-{hi}{mark} | {n} | {'#' * round(20 * n / most)} |")
    return [*rows, ""]


def length_histogram_png(bins: list[tuple[int, int, int]], max_length: int, path: Path, title: str) -> Path | None:
    """The token-length spread as a bar chart, max_length marked; None when there is nothing to plot."""
    if not bins:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.bar([lo for lo, _, _ in bins], [n for _, _, n in bins], width=[hi - lo for lo, hi, _ in bins], align="edge")
    if max_length <= bins[-1][1]:
        ax.axvline(max_length, color="crimson", linestyle="--", label=f"max_length {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def _dataset_lines(d: DatasetReport) -> list[str]:
    """The plan's dataset section: what was checked and measured, so a bad row or a truncation
    is seen before anything is spent."""
    return [
        "## Dataset",
        f"- rows: {d.rows}, every one checked in {d.check_seconds:.1f} s ({d.check_processes} process"
        f"{'es' if d.check_processes > 1 else ''}); tokens per row: min {d.tokens.min}, mean {d.tokens.mean}, "
        f"p95 {d.tokens.p95}, max {d.tokens.max}"
        + (f" (measured on a uniform sample of {d.token_rows_measured})" if d.token_rows_measured < d.rows else ""),
        f"- rows over max_length {d.max_length}: {d.rows_over_max_length} (truncation cuts {d.tokens_truncated} tokens); "
        f"duplicates: {d.duplicates}; empty turns: {d.empty_turns}"
        + (f"; converted with `{d.conversion}`" if d.conversion else ""),
        *([f"- evaluation rows (before/after, GGUF smoke test): {d.heldout_source}"] if d.heldout_source else []),
        *_image_lines(d),
        *length_table(d.length_histogram, d.max_length),
        *(f"- warning: {w}" for w in d.warnings),
    ]


def _image_lines(d: DatasetReport) -> list[str]:
    i = d.images
    if i is None:
        return []
    return [
        f"- images: {i.images} in {i.rows_with_images} rows ({i.rows_without_images} rows without one), every one "
        f"opened and copied to `{i.staged}`; tokens per image by the model's processor: min "
        f"{i.tokens_per_image_min}, mean {i.tokens_per_image_mean}, max {i.tokens_per_image_max} "
        f"({i.image_tokens:,} in all, counted in the tokens per row above)"
    ]


def _hardware_lines(h: HardwarePlan) -> list[str]:
    """The plan's hardware section: the machine, the parallelism and the memory estimate it rests on."""
    return [
        "## Hardware",
        f"- {h.description} (`{h.flavor}`, {h.backend} backend, {h.dtype})",
        f"- parameters: {h.parameters:,}; trained: {h.trainable_parameters:,}; LoRA: {'yes' if h.use_lora else 'no'} ({h.lora_reason})",
        *(
            [
                f"- vision tower and projector: {h.frozen_tower_parameters:,} parameters, frozen: the language model "
                "learns to read what the pretrained tower sees (most of the gain, and memory for neither its gradients "
                "nor its optimizer state); the images' activations pass through it without being kept"
            ]
            if h.frozen_tower_parameters
            else [
                f"- vision tower and projector: {h.trained_tower_parameters:,} parameters, trained in full "
                "(vision_tower: trained), with their gradients, optimizer state and activations"
            ]
            if h.trained_tower_parameters
            else []
        ),
        f"- processes: {h.processes} ({h.strategy}): {h.strategy_reason}",
        *(
            [f"- launch: `{launch_command(h)}` (`python train.py` runs it itself; the config is next to it)"]
            if h.processes > 1 and h.nodes == 1
            else [
                f"- launch: each of the {h.nodes} nodes runs `python train.py`, which starts `{launch_command(h)}` "
                "with the node's rank and the first node's address (PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, "
                "set by the TrainJob's torch runtime)"
            ]
            if h.nodes > 1
            else []
        ),
        f"- estimated peak memory{' per GPU' if h.processes > 1 and h.accelerator else ''}: "
        f"{_gb(h.estimated_peak_memory_gb)} of {_gb(h.available_memory_gb)} usable",
        "  (" + ", ".join(f"{k} {_gb(v)}" for k, v in h.memory_breakdown_gb.items()) + ")",
        *(
            [
                f"- host memory per node (CPU offload): {_gb(sum(h.host_memory_breakdown_gb.values()))} of "
                f"{_gb(h.available_host_memory_gb)} usable ("
                + ", ".join(f"{k} {_gb(v)}" for k, v in h.host_memory_breakdown_gb.items())
                + "); the optimizer step runs on the host"
            ]
            if h.offload
            else []
        ),
        *([f"- gradient checkpointing: {h.checkpointing_reason}"] if h.checkpointing_reason else []),
    ]


def _speed_lines(h: HardwarePlan) -> list[str]:
    """The plan's speed section: each throughput choice with its reason, so it can be overridden."""
    return [
        "## Speed",
        "Each choice yields to the same key in the spec's `training`.",
        "",
        "| setting | choice | why |",
        "|---|---|---|",
        f"| batch | {h.micro_batch} x {h.accumulation}"
        + (f" x {h.processes} processes" if h.processes > 1 else "")
        + f" | {h.batch_reason} |",
        *(f"| {c.setting} | {c.value} | {c.reason} |" for c in h.speed.choices),
        "",
        f"Padding: {h.padding_overhead:.2f} tokens computed per real token with this batching "
        "(simulated on the measured lengths).",
    ]


def plan_markdown(plan: RunPlan) -> str:
    """The plan as markdown, section by section: what is checked, run and paid before approval."""
    d, c = plan.dataset, plan.cost
    lines = [
        f"# Plan for run `{plan.run_name}`",
        "",
        f"**{plan.method.upper()}** of `{plan.model}` on `{d.source}` ({d.rows} rows, format `{d.format}`)",
        "",
        *(f"> **Note:** {n}\n" for n in plan.notes),
        *_dataset_lines(d),
        "",
        *_hardware_lines(plan.hardware),
        "",
        *_speed_lines(plan.hardware),
        "",
        "## Cost",
        f"- time: {_duration(c.hours)} (range {_duration(c.hours_low)} - {_duration(c.hours_high)})",
        f"- cost: {usd(c.usd)} (range {usd(c.usd_low)} - {usd(c.usd_high)}) at {usd(c.price_per_hour_usd)}/h",
        f"- basis: {c.basis}",
        "",
        "## Script",
        f"- `{plan.script.path}` ({plan.script.trainer}, sha256 `{plan.script.sha256[:12]}`)",
    ]
    if plan.inputs is not None:
        i = plan.inputs
        lines += [
            "",
            "## Inputs uploaded before the job starts",
            f"- to {i.destination}: {i.files} files, {i.bytes / 1e6:.1f} MB, ~{i.seconds:.0f} s (wall time, not billed)",
            *(f"- {item}" for item in i.items),
        ]
    if plan.trackio:
        lines += [
            "",
            f"Metrics: Trackio project `{plan.trackio['project']}`, run `{plan.trackio['run']}`; "
            f"`TRACKIO_DIR={plan.trackio['dir']} trackio show` opens the dashboard once the run has them.",
        ]
    return "\n".join(lines)


def signal_lines(s: RunSummary) -> list[str]:
    """The method's own signal, first logged value -> last (loss for SFT, margins for DPO)."""
    from tasks.core.methods import method_definition

    if s.job is None:
        return []
    lines = []
    for name in method_definition(s.plan.method).signal_metrics:
        if name in s.job.first_metrics and name in s.job.last_metrics:
            short = name.removeprefix("train/")
            lines.append(f"{short}: {s.job.first_metrics[name]:.4f} -> {s.job.last_metrics[name]:.4f}")
    return lines


def _job_lines(s: RunSummary) -> list[str]:
    """What the training job did: state, steps, cost, where it ran, and the loss and signal it logged."""
    if not s.job:
        return []
    j = s.job
    lines: list[str] = []
    steps = f"{j.steps}/{j.max_steps}" if j.max_steps else str(j.steps)
    lines.append(f"- training: {j.state}, {steps} steps in {j.duration_s:.1f} s, cost {usd(j.cost_usd)}")
    where = f" ({j.url})" if j.url else ""
    lines.append(f"- job: {j.backend} `{j.job_id}`{where}, {j.billed_s:.0f} s billed")
    if j.tokens_per_s:
        lines.append(f"- throughput: {j.tokens_per_s:.0f} tokens/s (last logged)")
    lines += [f"- {a}" for a in j.attempts]
    if j.losses:
        lines.append(
            f"- loss: {j.losses[0].loss:.4f} at step {j.losses[0].step} -> {j.losses[-1].loss:.4f} at step {j.losses[-1].step}"
        )
    lines += [f"- {line}" for line in signal_lines(s)]
    return lines


def _stage_lines(s: RunSummary) -> list[str]:
    """The stages as a table; a detail too long for a cell is cut there and given in full below it."""
    lines = ["", "## Stages", "| stage | status | detail |", "|---|---|---|"]
    long = []  # a long detail would run the table off the page: it gets its own line below it
    for st in s.stages:
        detail = st.detail.replace("\n", " ").replace("|", "\\|")
        if len(detail) > TABLE_CELL:
            long.append(f"- **{st.stage}**: {st.detail}")
            detail = detail[: TABLE_CELL - 20].rsplit(" ", 1)[0] + " ... (in full below)"
        lines.append(f"| {st.stage} | {st.status} | {detail} |")
    if long:
        lines += ["", *long]
    return lines


def _gguf_lines(s: RunSummary) -> list[str]:
    """The GGUF files as a table, one row per quantization with its checks; none when there are none."""
    if s.gguf is None or not s.gguf.files:
        return []
    return [
        "",
        "## GGUF files",
        "",
        "| type | size | fallback tensors | perplexity (HF model) | top-1 agreement | tokenization | tok/s | published |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {row[0]} | {row[1]} | {row[7]} | {row[2]} | {row[3]} | {row[4]} | {row[5]} | {row[6]} |"
            for row in gguf_rows(s)
        ),
    ]


def summary_markdown(s: RunSummary) -> str:
    """The final report as markdown: outcome, training, evaluation, estimates, stages, GGUF files, outputs."""
    p = s.plan
    lines = [f"# Run `{s.run_name}`", ""]
    if s.error:
        lines += [f"**Failed:** {s.error}", ""]
        if s.error_code:
            lines += [f"Error code `{s.error_code}`; what usually helps: {s.error_fix}.", ""]
    lines.append(
        f"**{p.method.upper()}** of `{p.model}` on `{p.dataset.source}` ({p.dataset.rows} rows, `{p.dataset.format}`)"
    )
    h = p.hardware
    lines.append(
        f"on {h.description}, LoRA: {'yes' if h.use_lora else 'no'}"
        + (f", {h.processes} processes ({h.strategy}, global batch {h.global_batch})" if h.processes > 1 else "")
    )
    lines += _job_lines(s)
    if s.approval:
        lines.append(
            f"- approval: {'approved' if s.approval.approved else 'declined'} by {s.approval.by} ({s.approval.reason})"
        )
    if s.evaluation is not None:
        lines += ["", "## Did it help?", "", *evaluation_lines(s.evaluation)]
    lines += estimate_lines(s)
    lines += _stage_lines(s)
    lines += _gguf_lines(s)
    lines += ["", "## Outputs", *(f"- {k}: `{v}`" for k, v in s.outputs.items())]
    return "\n".join(lines)


TABLE_CELL = 140  # characters of a stage's detail shown in the table


def estimate_lines(s: RunSummary) -> list[str]:
    """The plan's estimates next to what the training measured: how far to trust the next plan,
    and what `python -m flows.calibrate` learns from."""
    m = s.result.measured if s.result else None
    if m is None:
        return []
    c, h = s.plan.cost, s.plan.hardware
    share = min(1.0, m.optimizer_steps / c.optimizer_steps) if c.optimizer_steps else 1.0
    lines = [
        "",
        "## Estimate vs measured",
        f"Measured on {m.device}: {m.optimizer_steps} optimizer steps"
        + (
            f", {m.processes} processes ({h.strategy}, world size {m.processes}, global batch {m.global_batch})"
            if m.processes > 1
            else ""
        )
        + (f" (this job's share of the planned {c.optimizer_steps})" if share < 1 else "")
        + ". `python -m flows.calibrate` turns such runs into corrections the planner applies.",
        "",
        "| quantity | estimated | measured | measured / estimated |",
        "|---|---|---|---|",
    ]
    for name, est, got, fmt in _estimate_rows(c, h, m, share):
        ratio = f"{got / est:.2f}" if est and got else "-"
        lines.append(f"| {name} | {fmt.format(est) if est else '-'} | {fmt.format(got) if got else '-'} | {ratio} |")
    if c.calibration:
        lines.append(f"\nThe estimate was already corrected: {c.calibration}.")
    return lines + _useful_flops_note(c, h, m)


def _estimate_rows(
    c: CostEstimate, h: HardwarePlan, m: TrainingMeasurement, share: float
) -> list[tuple[str, float | None, float | None, str]]:
    """Each quantity the plan estimated and the training measured, with its format."""
    rows: list[tuple[str, float | None, float | None, str]] = [
        ("training time (s)", c.compute_s * share if c.compute_s else None, m.train_s, "{:.1f}"),
        (
            "time per optimizer step (s)",
            c.compute_s / c.optimizer_steps if c.optimizer_steps else None,
            m.step_s,
            "{:.3f}",
        ),
        (
            "real tokens per second",
            c.tokens / c.compute_s if c.compute_s and c.tokens else None,
            m.tokens_per_s,
            "{:,.0f}",
        ),
        ("peak memory (GB)", h.estimated_peak_memory_gb, m.peak_memory_gb, "{:.2f}"),
    ]
    if m.processes > 1:
        rows.insert(
            3,
            (
                f"real tokens per second per {'GPU' if h.accelerator else 'process'}",
                c.tokens / c.compute_s / h.processes if c.compute_s and c.tokens else None,
                m.tokens_per_s / m.processes if m.tokens_per_s else None,
                "{:,.0f}",
            ),
        )
    if c.useful_flops_per_token and c.peak_flops and c.compute_s and c.tokens:
        peak = m.matmul_peak_flops or c.peak_flops  # a CPU's, measured in the run itself
        rows.append(
            (
                "useful FLOPs per second, share of the peak",
                c.useful_flops_per_token * c.tokens / c.compute_s / c.peak_flops,
                c.useful_flops_per_token * m.tokens_per_s / peak if m.tokens_per_s else None,
                "{:.1%}",
            )
        )
    return rows


def _useful_flops_note(c: CostEstimate, h: HardwarePlan, m: TrainingMeasurement) -> list[str]:
    """What the share of the peak divides: the yardstick is the device's limit, not TRL's defaults."""
    if not (c.useful_flops_per_token and c.peak_flops):
        return []
    measured = h.flavor in LOCAL_FLAVORS
    in_run = m.matmul_peak_flops
    where = (
        f"{c.peak_flops / 1e12:.3g} TFLOP/s estimated, this machine's matmul measured when the run was planned"
        + (f"; {in_run / 1e12:.3g} TFLOP/s measured, by the script right after it trained" if in_run else "")
        if measured
        else f"{c.peak_flops / 1e12:.3g} TFLOP/s, {h.flavor}'s dense peak"
    )
    return [
        f"\nUseful FLOPs: {c.useful_flops_per_token:.3g} per real token (the model's forward and backward, "
        f"attention over each row's own tokens; no padding, no recomputation), over a peak of {where}."
    ]


def gguf_rows(s: RunSummary) -> list[tuple[str, ...]]:
    rows = []
    for f in s.gguf.files if s.gguf else []:
        ppl, agree, tps = gguf_cells(f)
        rows.append(
            (
                f.quant,
                f"{f.size_mb:.1f} MB",
                ppl,
                agree,
                f"{f.tokenization_matches}/{f.tokenization_checked}",
                tps,
                "yes" if f.passed else "no: " + "; ".join(f.problems),
                fallback_text(f),
            )
        )
    return rows


def summary_text(s: RunSummary) -> str:
    """The console version: the same facts, without markdown tables."""
    p = s.plan
    out = [f"run {s.run_name}: {'FAILED: ' + s.error if s.error else 'done'}"]
    out.append(f"  trained {p.method} on {p.model} with {p.dataset.source} ({p.dataset.rows} rows, {p.dataset.format})")
    out.append(f"  hardware: {p.hardware.description}; LoRA: {'yes' if p.hardware.use_lora else 'no'}")
    if s.job:
        out.append(
            f"  training: {s.job.state}, {s.job.steps} steps in {s.job.duration_s:.1f} s, cost {usd(s.job.cost_usd)}"
        )
        out.append(f"  job: {s.job.backend} {s.job.job_id}" + (f" {s.job.url}" if s.job.url else ""))
        out += [f"  {a}" for a in s.job.attempts]
        if s.job.losses:
            first, last = s.job.losses[0], s.job.losses[-1]
            out.append(f"  loss: {first.loss:.4f} (step {first.step}) -> {last.loss:.4f} (step {last.step})")
        out += [f"  {line}" for line in signal_lines(s)]
    if s.evaluation is not None:
        out.append(f"  did it help? {s.evaluation.sentence()}")
        out += [
            f"  task {t.task}: {t.verdict}, {t.metric} {t.base:.4g} -> {t.trained:.4g} over {t.rows} rows"
            for t in s.evaluation.tasks
        ]
    out.append("  stages:")
    for st in s.stages:
        detail = st.detail.splitlines()[0] if st.detail else ""
        out.append(f"    {st.stage:<18} {st.status:<8} {detail}")
    if s.gguf is not None and s.gguf.files:
        out.append("  gguf:  type      size      perplexity (HF)     agreement  tokenization  tok/s  published")
        out += [f"         {r[0]:<9} {r[1]:<9} {r[2]:<19} {r[3]:<10} {r[4]:<13} {r[5]:<6} {r[6]}" for r in gguf_rows(s)]
        out += [f"         {r[0]}: {r[7]}" for r in gguf_rows(s) if r[7] != "none"]
    out.append("  outputs:")
    out += [f"    {k:<10} {v}" for k, v in s.outputs.items()]
    return "\n".join(out)
