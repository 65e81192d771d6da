"""The lifecycle every method shares, as one Prefect flow: plan, approve, train, evaluate,
convert, smoke-test, publish, report. `flows/sft.py`, `dpo.py` and `grpo.py` are this flow
under the method's name.

Each step below is one stage (two for approval, three for training) and records its outcome
in the run's record; a failure anywhere is recorded at its stage, the report is written, and
the error is raised. A stage that ran before with the same inputs is taken from its cache
(`tasks/stages/cache.py`), so a re-run pays for nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext

from flows.planning import plan_run
from flows.run_training import train_task
from tasks.core.errors import quiet_refusals
from tasks.core.locks import run_lock
from tasks.core.methods import METHODS, method_definition, outputs_for_method
from tasks.core.models import (
    Approval,
    CostEstimate,
    EvaluationResult,
    GgufFiles,
    RunPlan,
    RunSummary,
    StageOutcome,
    TrainedModel,
)
from tasks.core.rundir import flow_run_name, named
from tasks.core.spec import RunSpec, SpecError, backend_settings
from tasks.evaluate.verdict import blocks_publish
from tasks.plan.cost import repriced
from tasks.report.render import plan_markdown
from tasks.run.backends.base import account_detail
from tasks.run.jobs import cancel_job_of_flow_run
from tasks.stages import artifacts
from tasks.stages.approval import request_approval, request_publish_decision
from tasks.stages.cache import (
    call_cached,
    gguf_key,
    gguf_problems,
    publish_key,
    published_problems,
    run_cached,
    smoke_key,
    trained_problems,
    training_key,
    trusted_result,
)
from tasks.stages.evaluation import evaluate_task
from tasks.stages.export import convert_gguf_task, push_to_hub_task, smoke_test_gguf_task
from tasks.stages.record import RunRecord
from tasks.stages.stage import say
from tasks.stages.training import check_account_task

quiet_refusals()


@flow(name="lifecycle", flow_run_name=flow_run_name, log_prints=True, on_cancellation=[cancel_job_of_flow_run])
def lifecycle(
    spec: RunSpec, dry_run: bool = False, approval_timeout_s: int = 3600, approve_up_to_usd: float | None = None
) -> RunSummary:
    """Above the spec's auto_approve_usd the run pauses for approval (at most
    approval_timeout_s); approve_up_to_usd pre-approves any estimate up to that amount."""
    check_method(spec)
    spec = outputs_for_method(named(spec))
    with run_lock(str(spec.name)):  # one flow per run name
        plan = plan_run(spec)
        artifacts.markdown(artifacts.artifact_key("plan", plan.run_name), plan_markdown(plan), description="the plan")
        record = RunRecord(plan)
        if dry_run:
            return record.dry_run()
        with record.reporting():
            cleared = approve(record, spec, plan, approval_timeout_s, approve_up_to_usd)
            trained = train(record, spec, plan, cleared)
            evaluation = evaluate(record, spec, plan, approval_timeout_s)
            gguf = convert(record, spec, plan, trained)
            tested = smoke_test(record, spec, plan, trained, gguf)
            publish(record, spec, plan, trained, tested, evaluation)
        return record.finish(None)


def check_method(spec: RunSpec) -> None:
    """The sft flow refuses a dpo spec (and so on); the plain lifecycle takes any method."""
    context = FlowRunContext.get()
    method = context.flow.name if context is not None and context.flow is not None else None
    if method in METHODS and spec.method != method:
        raise ValueError(f"the {method} flow got a {spec.method} spec; use python -m flows.{spec.method}")


@dataclass(frozen=True)
class Cleared:
    """What training may go ahead with: the cost at today's price, the approval (None when a
    finished training with these inputs is on record), the training's key."""

    cost: CostEstimate
    approval: Approval | None
    key: str
    refresh: bool  # a record with this key exists but its files changed: train again


def approve(
    record: RunRecord, spec: RunSpec, plan: RunPlan, timeout_s: int, approve_up_to_usd: float | None
) -> Cleared:
    """The account and the spend, checked before anything is paid for; both are skipped when
    a finished training with these inputs is on record."""
    run_dir = Path(plan.run_dir)
    with record.stage("check_account") as step:
        refuse_estimated_tokens(plan)
        key = training_key(plan, spec.backend)
        # looked up (and its files hashed) once: the answer decides approval and the call
        done, refresh = trusted_result(run_dir, key, trained_problems, say, "train")
        if done is not None:
            step.status = "skipped"
            step.detail = (
                f"training with these inputs finished before (job {done.job.job_id}); nothing to submit or pay for"
            )
        else:
            account = check_account_task(spec.backend, plan.hardware.flavor, backend_settings(spec))
            cost = repriced(plan.cost, account.price_per_hour_usd)
            step.detail = account_detail(account, cost)
    if done is not None:
        record.add("approve", "skipped", step.detail)
        return Cleared(plan.cost, None, key, refresh)
    with record.stage("approve") as step:
        approval = request_approval(
            cost, spec.budget, plan.run_name, run_dir, timeout_s, approve_up_to_usd=approve_up_to_usd
        )
        record.fields["approval"] = approval
        step.detail = approval.reason
    return Cleared(cost, approval, key, refresh)


def refuse_estimated_tokens(plan: RunPlan) -> None:
    if plan.dataset.token_counts == "estimated":
        raise SpecError(
            "this plan's token counts, time and cost are estimates, not measurements: "
            + next((w for w in plan.dataset.warnings if "ESTIMATED" in w), "the tokenizer cannot encode")
            + ". Nothing was submitted; `--dry-run` still shows the estimated plan"
        )


def train(record: RunRecord, spec: RunSpec, plan: RunPlan, go: Cleared) -> TrainedModel:
    """Submit, follow and fetch (`flows/run_training.py`), or the finished training on record."""
    with record.stage("submit_job") as step:
        args = (spec, plan, go.cost, go.approval)
        trained, hit = call_cached(train_task, Path(plan.run_dir), go.key, go.refresh, *args)
        record.fields["job"], record.fields["result"] = trained.job, trained.result
        step.status = "cached" if hit else "passed"
        step.detail = trained.submitted
    record.add("monitor", step.status, trained.job.detail)
    record.add("fetch_artifacts", step.status, trained.result.model_dir)
    return trained


def evaluate(record: RunRecord, spec: RunSpec, plan: RunPlan, timeout_s: int) -> EvaluationResult | None:
    """The verdict, base against trained; a regression past max_regression asks before publishing."""
    with record.stage("evaluate") as step:
        evaluation = evaluate_task(
            Path(plan.run_dir), spec.method, spec.evaluation.noise_sigmas, plan.run_name, spec.evaluation.baseline
        )
        record.fields["evaluation"] = evaluation
        if evaluation is None:
            step.status, step.detail = "skipped", "no held-out rows"
            return None
        step.detail = evaluation.sentence()
        stopped = blocks_publish(evaluation, spec.evaluation.max_regression)
        if stopped:  # a person decides where one can answer; otherwise nothing is published
            step.detail += "; " + request_publish_decision(stopped, plan.run_name, Path(plan.run_dir), timeout_s)
    return evaluation


def convert(record: RunRecord, spec: RunSpec, plan: RunPlan, trained: TrainedModel) -> GgufFiles:
    with record.stage("convert_gguf") as step:
        if method_definition(spec.method).no_gguf:  # the plan said why; so does the stage
            why = f"no GGUF files: {method_definition(spec.method).no_gguf}"
            gguf = GgufFiles(outcome=StageOutcome(stage="convert_gguf", status="skipped", detail=why))
            step.reported(gguf.outcome, False)
            return gguf
        run_dir, result = Path(plan.run_dir), trained.result
        key = gguf_key(result, spec.outputs)
        gguf, hit = run_cached(
            convert_gguf_task, run_dir, key, gguf_problems, say, result, spec.outputs, run_dir, plan.run_name
        )
        step.reported(gguf.outcome, hit)
    return gguf


def smoke_test(record: RunRecord, spec: RunSpec, plan: RunPlan, trained: TrainedModel, gguf: GgufFiles) -> GgufFiles:
    with record.stage("smoke_test_gguf") as step:
        result, data = trained.result, plan.dataset
        key = smoke_key(gguf, result, data, spec.outputs)
        args = (gguf, result, data, plan.run_name, spec.outputs)
        tested, hit = run_cached(smoke_test_gguf_task, Path(plan.run_dir), key, gguf_problems, say, *args)
        record.fields["gguf"] = tested
        step.reported(tested.outcome, hit)
    return tested


def publish(
    record: RunRecord,
    spec: RunSpec,
    plan: RunPlan,
    trained: TrainedModel,
    tested: GgufFiles,
    evaluation: EvaluationResult | None,
) -> None:
    with record.stage("push_to_hub") as step:
        key = publish_key(spec, trained.job, trained.result, tested)
        args = (spec, plan, trained.job, trained.result, tested, evaluation)
        published, hit = run_cached(push_to_hub_task, Path(plan.run_dir), key, published_problems, say, *args)
        record.fields["published"] = published
        step.reported(published.outcome, hit)
