"""Thin Prefect task wrappers around the plain stage functions.

The wrappers add retries, names and artifacts; the work stays in the plain functions so
each can be called and tested without Prefect (`stage.fn(...)` also skips Prefect).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import artifacts
from tasks.cache import BY_KEY
from tasks.data.validate import HeldOut, validate_dataset
from tasks.errors import UserFacingError
from tasks.evaluate.verdict import EvaluationResult, judge, judge_record
from tasks.gguf import convert_gguf, fallback_text
from tasks.gguf_smoke import smoke_test_all
from tasks.hub import push_to_hub
from tasks.methods import MethodDefinition
from tasks.models import (
    Approval,
    CostEstimate,
    DatasetReport,
    GgufFiles,
    HardwarePlan,
    JobHandle,
    JobResult,
    JobStatus,
    LossPoint,
    PublishedModel,
    RunPlan,
    StageOutcome,
    TrainedModel,
    TrainingScript,
)
from tasks.money import usd
from tasks.plan.cost import estimate_cost
from tasks.plan.hardware import select_hardware
from tasks.report import gguf_cells
from tasks.rewards import RewardSource
from tasks.run.backends import Account, JobRequest, get_backend
from tasks.run.fetch import fetch_artifacts
from tasks.run.monitor import Guard, Progress, monitor_job
from tasks.script import build_script
from tasks.spec import Outputs, PoolSettings, RunSpec


class OutputsChanged(UserFacingError, RuntimeError):
    """A file an earlier stage wrote is not as it was recorded."""


def trust_outputs(result: JobResult, gguf: GgufFiles | None) -> None:
    """Refuse to test or publish files that differ from what the stage that wrote them recorded."""
    from tasks.cache import gguf_problems
    from tasks.manifest import problems

    run_dir = Path(result.model_dir).parent
    bad = problems(run_dir, result.manifest) + (gguf_problems(gguf) if gguf is not None else [])
    if bad:
        raise OutputsChanged(
            f"{'; '.join(bad[:5])}: these outputs changed after they were written and are not used. "
            "Run the flow again: the stages that made them run again."
        )


def _log(message: str) -> None:
    try:
        get_run_logger().info(message)
    except Exception:  # called outside a run: print to stderr instead
        import sys

        print(message, file=sys.stderr)


@task(name="validate_dataset", cache_policy=NO_CACHE)
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
    tokenizer = planning_tokenizer(model_path, chat_template_path)
    report = validate_dataset(source, method, tokenizer, max_length, out_dir, split, columns, conversion, held_out)
    from tasks.report import length_histogram_png

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
    _log(f"dataset ok: {report.rows} rows, format {report.format}, mean {report.tokens.mean} tokens/row ({what})")
    return report


def planning_tokenizer(model_path: str, chat_template_path: str | None = None) -> Any:
    """The model's tokenizer when it can encode, else a stated characters-per-token estimate
    (the plan, its JSON and the report say so, and a real run refuses it). A chat template
    named by training.chat_template_path is applied as TRL will apply it."""
    from tasks.data.token_stats import CharEstimateTokenizer, tokenizer_problem
    from tasks.model_source import ModelSourceError, load_config, load_tokenizer

    try:
        model_type = getattr(load_config(model_path), "model_type", None)
    except ModelSourceError:
        model_type = None
    try:
        tokenizer = load_tokenizer(model_path)
    except ModelSourceError as e:
        return CharEstimateTokenizer(model_type, f"could not be read ({str(e)[:120]})")
    problem = tokenizer_problem(tokenizer)
    if problem:
        return CharEstimateTokenizer(model_type, problem)
    if chat_template_path:
        import copy

        tokenizer = copy.copy(tokenizer)  # the cached tokenizer stays as the model has it
        if Path(chat_template_path).is_file():
            tokenizer.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
        else:
            tokenizer.chat_template = load_tokenizer(chat_template_path).chat_template
    return tokenizer


@task(name="check_rewards", cache_policy=NO_CACHE)
def check_rewards_task(names: list[str], report: DatasetReport) -> list[RewardSource]:
    """GRPO: resolve the spec's reward functions and call each on real rows before any spend."""
    import json

    from tasks.rewards import check_rewards, resolve_rewards

    rewards = resolve_rewards(names)
    rows = [json.loads(line) for line in Path(report.prepared_path).read_text().splitlines()[:4] if line.strip()]
    check_rewards(rewards, rows)
    _log(f"rewards ok: {', '.join(src.name for _, src in rewards)}")
    return [src for _, src in rewards]


@task(name="select_hardware", cache_policy=NO_CACHE)
def select_hardware_task(
    spec: RunSpec, model_path: str, training_args: dict[str, Any], report: DatasetReport
) -> HardwarePlan:
    from tasks.model_source import load_config

    plan, _ = select_hardware(spec, load_config(model_path), training_args, report)
    _log(f"hardware: {plan.description}; {plan.mode}; peak ~{plan.estimated_peak_memory_gb:.2f} GB")
    return plan


@task(name="estimate_cost", cache_policy=NO_CACHE)
def estimate_cost_task(
    spec: RunSpec, model_path: str, plan: HardwarePlan, report: DatasetReport, training_args: dict[str, Any]
) -> CostEstimate:
    from tasks.model_source import load_config

    cost = estimate_cost(spec, load_config(model_path), plan, report, training_args)
    _log(f"estimate: {cost.hours * 60:.1f} min, {usd(cost.usd)} (range {usd(cost.usd_low)}-{usd(cost.usd_high)})")
    return cost


@task(name="build_script", cache_policy=NO_CACHE)
def build_script_task(method: MethodDefinition, config: dict[str, Any], run_dir: Path) -> TrainingScript:
    script = build_script(method, config, run_dir)
    source = Path(script.path).read_text()
    artifacts.markdown(
        artifacts.artifact_key("script", config["run_name"]),
        f"# Training script `{script.path}`\n\nsha256 `{script.sha256}`\n\n```python\n{source}\n```",
        description="the generated, self-contained training script",
    )
    return script


@task(name="check_account", retries=0, cache_policy=NO_CACHE)
def check_account_task(backend_name: str, flavor: str, pool: PoolSettings | None = None) -> Account:
    """Credentials, namespace and the flavor's current price, before approval and upload."""
    account = get_backend(backend_name, pool).preflight(flavor)
    if account.namespace:
        price = f"{usd(account.price_per_hour_usd)}/h" if account.price_per_hour_usd is not None else "no price"
        _log(f"{backend_name}: namespace {account.namespace}; {flavor} {price} from {account.price_source}")
    return account


@task(name="submit_job", cache_policy=NO_CACHE)  # the backend retries network faults itself, idempotently
def submit_job_task(backend_name: str, request: JobRequest) -> JobHandle:
    backend = get_backend(backend_name, request.pool)
    existing = backend.find_live(request)
    if existing is not None:
        _log(f"re-attached to {existing.job_id}, still alive from an earlier start of this run")
        return existing
    handle = backend.submit(request)
    where = f" ({handle.url})" if handle.url else ""
    _log(f"submitted {handle.job_id}{where} on {handle.flavor}; log: {handle.log_path}")
    _log(
        f"follow it with `python -m flows.status {request.run_name}`, cancel with `python -m flows.cancel {request.run_name}`"
    )
    return handle


class FlowCancelWatch:
    """A reason to stop when the surrounding flow run is being cancelled (a plain local run
    is not interrupted by Prefect's cancel, so the monitor looks for itself), checked at
    most every `every_s` seconds."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.checked_at = time.monotonic()

    def __call__(self) -> str | None:
        if time.monotonic() - self.checked_at < self.every_s:
            return None
        self.checked_at = time.monotonic()
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return None
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(ctx.flow_run.id).state
        except Exception:
            return None
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            return "the flow run was cancelled; the job was cancelled with it"
        return None


@task(name="monitor", cache_policy=NO_CACHE)
def monitor_task(handle: JobHandle, run_name: str, guard: Guard, poll_s: float = 1.0) -> JobStatus:
    backend = get_backend(handle.backend)
    bar = ProgressBarFor(run_name)
    status = monitor_job(backend, handle, guard, poll_s=poll_s, on_update=bar.update, stop_requested=FlowCancelWatch())
    bar.finish(status)
    _log(f"job {status.state}: {status.detail.splitlines()[0] if status.detail else ''}")
    return status


class ProgressBarFor:
    """Turns monitor updates into a Prefect progress artifact, a loss table and log lines."""

    TABLE_EVERY_S = 15.0  # table artifacts cannot be updated in place: each refresh is a new version

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.bar = artifacts.ProgressBar(artifacts.artifact_key("progress", run_name), "training progress")
        self.logged = 0
        self.state = ""
        self.table_at = time.monotonic()

    def update(self, p: Progress) -> None:
        self.bar.update(p.percent)
        extra = "".join(
            f" {k.removeprefix('train/')} {p.last_metrics[k]:.4f}"
            for k in ("train/rewards/margins", "train/rewards/accuracies", "train/reward")
            if k in p.last_metrics
        )
        money = f" | {usd(p.cost_usd)} so far" if p.cost_usd else ""
        if p.projected_usd is not None and p.cost_usd:
            money += f", ~{usd(p.projected_usd)} projected"
        eta = f" | ETA {p.eta_s / 60:.1f} min" if p.eta_s is not None else ""
        speed = f" | {p.tokens_per_s:.0f} tok/s" if p.tokens_per_s else ""
        for point in p.losses[self.logged :]:
            last = point is p.losses[-1]
            _log(
                f"step {point.step}/{p.max_steps or '?'} loss {point.loss:.4f}"
                + (f"{extra}{speed}{eta}{money}" if last else "")
            )
        self.logged = len(p.losses)
        if p.state != self.state:
            self.state = p.state
            _log(f"job {p.state}" + (f" ({p.billed_s:.0f} s billed)" if p.billed_s and p.cost_usd else ""))
        if time.monotonic() - self.table_at > self.TABLE_EVERY_S:
            self._table(p.losses)

    def _table(self, losses: list[LossPoint]) -> None:
        self.table_at = time.monotonic()
        artifacts.table(
            artifacts.artifact_key("loss", self.run_name),
            [{"step": p.step, "loss": round(p.loss, 5)} for p in losses],
            description="training loss (from the job's progress lines)",
        )

    def finish(self, status: JobStatus) -> None:
        if status.state == "completed":
            self.bar.update(100.0)
        self._table(status.losses)


@task(name="fetch_artifacts", cache_policy=NO_CACHE)  # downloads are retried inside the backend
def fetch_artifacts_task(handle: JobHandle, status: JobStatus) -> JobResult:
    result = fetch_artifacts(get_backend(handle.backend), handle, status)
    _log(f"model: {result.model_dir} ({result.size_mb} MB)")
    return result


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


@task(name="evaluate", cache_policy=NO_CACHE)  # reads one file the job wrote: nothing to retry or cache
def evaluate_task(
    run_dir: Path, method: str, sigmas: float, run_name: str, baseline_model: str | None = None
) -> EvaluationResult | None:
    found = evaluate(run_dir, method, sigmas, baseline_model)
    if found is None:
        _log("evaluate: no held-out rows (under 40 rows and no evaluation.held_out count): skipped")
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
    _log(f"evaluate: {found.sentence()}")
    if found.baseline is not None:
        _log(f"evaluate: against the baseline {baseline_model}: {found.baseline.sentence()}")
    return found


@task(name="train", cache_policy=BY_KEY)
def train_task(
    spec: RunSpec,
    plan: RunPlan,
    cost: CostEstimate,
    approval: Approval | None,
    poll_s: float | None = None,
    cache_key: str = "",
) -> TrainedModel:
    """Submit, follow, fetch (tasks/run/training.py); persisted under its training key."""
    from tasks.run.training import train

    return train(spec, plan, cost, approval, poll_s, cache_key, say=_log)


@task(name="convert_gguf", cache_policy=BY_KEY)
def convert_gguf_task(
    result: JobResult, outputs: Outputs, run_dir: Path, run_name: str, cache_key: str | None = None
) -> GgufFiles:
    gguf = convert_gguf(result, outputs, run_dir, run_name)
    _log(f"convert_gguf {gguf.outcome.status}: {gguf.outcome.detail}")
    return gguf


@task(name="smoke_test_gguf", cache_policy=BY_KEY)
def smoke_test_gguf_task(
    gguf: GgufFiles,
    result: JobResult,
    report: DatasetReport,
    run_name: str,
    outputs: Outputs | None = None,
    cache_key: str | None = None,
) -> GgufFiles:
    if not gguf.files:
        return gguf.model_copy(
            update={"outcome": StageOutcome(stage="smoke_test_gguf", status="skipped", detail="no GGUF files")}
        )
    trust_outputs(result, gguf)
    tested = smoke_test_all(
        gguf, Path(result.model_dir), Path(report.heldout_path), Path(report.prepared_path), outputs
    )
    artifacts.table(
        artifacts.artifact_key("gguf", run_name),
        [
            {
                "type": f.quant,
                "size (MB)": f"{f.size_mb:.1f}",
                "perplexity (HF model's)": cells[0],
                "top-1 agreement": cells[1],
                "tokenization identical": f"{f.tokenization_matches}/{f.tokenization_checked} texts",
                "generation (tokens/s)": cells[2],
                "fallback tensors": fallback_text(f),
                "passed": "yes" if f.passed else "no: " + "; ".join(f.problems),
            }
            for f, cells in ((f, gguf_cells(f)) for f in tested.files)
        ],
        description="GGUF smoke test: each file against the transformers model",
    )
    _log(f"smoke_test_gguf {tested.outcome.status}: {tested.outcome.detail}")
    return tested


@task(name="push_to_hub", cache_policy=BY_KEY)  # transient HTTP errors are retried inside, with backoff
def push_to_hub_task(
    spec: RunSpec,
    plan: RunPlan,
    status: JobStatus,
    result: JobResult,
    gguf: GgufFiles | None,
    evaluation: EvaluationResult | None = None,
    cache_key: str | None = None,
) -> PublishedModel:
    trust_outputs(result, gguf)
    published = push_to_hub(spec, plan, status, result, gguf, evaluation)
    _log(f"push_to_hub {published.outcome.status}: {published.outcome.detail}")
    return published
