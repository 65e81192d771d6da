"""Decide whether the estimated spend may go ahead.

Under `budget.auto_approve_usd` the run is approved automatically and the reason recorded;
above `budget.max_usd` it is refused before anyone is asked; in between a person (or an
agent) must answer. The asking is Prefect's `pause_flow_run(wait_for_input=...)`, done by
the flow (pauses belong to flow runs, not tasks) with `ApprovalInput` as the typed form.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.errors import UserFacingError
from tasks.core.models import Approval, CostEstimate
from tasks.core.money import duration, usd
from tasks.core.spec import Budget

# The flow run input key under which a paused run says what it waits for, readable by any
# door: `GET /api/flow_runs/<id>/input/finetune-pending-<kind>` (kind "spend" or "publish").
PENDING_INPUT_KEY = "finetune-pending-{kind}"


class PendingDecision(BaseModel):
    """What a paused run waits for, in numbers an agent can show its user before answering."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description='"spend": approve the estimated cost; "publish": publish a model that got worse')
    run: str = Field(description="the run's name (its folder under runs/)")
    flow_run_id: str
    question: str = Field(description="what to decide, in a sentence")
    estimated_usd: float | None = Field(None, description="the run's estimated cost (spend decisions)")
    estimated_usd_high: float | None = Field(None, description="the top of the estimate's range")
    max_usd: float | None = Field(None, description="the spec's budget.max_usd: no approval may go above it")
    answer_fields: dict[str, str] = Field(description="the run_input fields of the resume call and what they mean")
    answer_cli: str = Field(description="the command that answers it from a terminal")


class BudgetExceeded(UserFacingError, RuntimeError):
    """The estimate is above max_usd: refused without asking."""


class NotApproved(UserFacingError, RuntimeError):
    """A person declined the run, or nobody answered before the timeout."""


class _Form(RunInput):
    """A pause's form. Prefect's `with_initial_data` rebuilds each pre-filled field from its type
    and value alone, which drops its label and help text; here the field keeps them."""

    @classmethod
    def with_initial_data(cls, description: str | None = None, **kwargs: Any) -> Any:
        labelled = {}
        for key, value in kwargs.items():
            info = copy.copy(cls.model_fields[key])
            info.default = value
            labelled[key] = info
        return super().with_initial_data(description, **labelled)


class PublishStopped(UserFacingError, RuntimeError):
    """The trained model is worse than its base beyond the spec's threshold: nothing is published."""


class PublishDecision(_Form):
    """The form shown when a trained model came out worse than its base: publish it anyway?"""

    publish: bool = Field(
        title="Publish it anyway", description="true converts and publishes the worse model; false stops here"
    )
    reason: str = Field("", title="Reason", description="why; recorded in the run's report")


class ApprovalInput(_Form):
    """The form shown in the Prefect UI (and accepted over the REST API) at the pause."""

    approve: bool = Field(title="Approve this spend", description="true starts the run; false stops it, unpaid")
    reason: str = Field("", title="Reason", description="why; recorded in the run's report")
    max_usd: float = Field(
        0.0,
        ge=0,
        title="Spending cap (USD)",
        description="the most this run may spend: the budget guard cancels the job before it passes this "
        "(pre-filled with the spec's budget.max_usd)",
    )


def auto_decision(cost: CostEstimate, budget: Budget) -> Approval | None:
    """An automatic decision, or None when a person must decide.

    Compared against the high end of the estimate's range, so a run is only waved
    through when even its pessimistic cost is under the threshold.
    """
    if cost.usd > budget.max_usd:
        raise BudgetExceeded(
            f"estimated cost {usd(cost.usd)} (range {usd(cost.usd_low)}-{usd(cost.usd_high)}) is above "
            f"budget.max_usd {usd(budget.max_usd)}; raise max_usd, shorten the run, or pick cheaper hardware"
        )
    if cost.usd_high <= budget.auto_approve_usd:
        return Approval(
            approved=True,
            by="auto",
            reason=(f"estimated {usd(cost.usd_high)} at most, within auto_approve_usd {usd(budget.auto_approve_usd)}"),
            max_usd=budget.max_usd,
            estimated_usd=cost.usd,
        )
    return None


def decision_from_input(answer: ApprovalInput, cost: CostEstimate, budget: Budget) -> Approval:
    if not answer.approve:
        raise NotApproved(f"the run was declined{': ' + answer.reason if answer.reason else ''}")
    max_usd = answer.max_usd if "max_usd" in answer.model_fields_set or answer.max_usd else budget.max_usd
    if cost.usd > max_usd:
        raise NotApproved(f"approved max_usd {usd(max_usd)} is below the estimate {usd(cost.usd)}")
    return Approval(
        approved=True,
        by="user",
        reason=answer.reason or "approved",
        max_usd=max_usd,
        estimated_usd=cost.usd,
    )


def has_api_server() -> bool:
    """True when flows report to a Prefect server someone else can reach (PREFECT_API_URL);
    False in Prefect's local mode, where a temporary server lives only as long as the run."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def how_to_approve(run_name: str, cost: CostEstimate) -> str:
    return (
        f"run '{run_name}' needs approval: estimated {usd(cost.usd)} (up to {usd(cost.usd_high)}). Approve it with "
        f"`--approve-up-to {cost.usd_high:.2f}` on the command line, or run against a Prefect server "
        "(PREFECT_API_URL) and answer the pause from the UI, `python -m flows.approve <run>` or the REST API"
    )


def _terminal_prompt(run_name: str, cost: CostEstimate, ask: Callable[[str], str] | None = None) -> bool:
    print(
        f"\nRun '{run_name}' is estimated at {usd(cost.usd)} (range {usd(cost.usd_low)}-{usd(cost.usd_high)}), "
        f"{duration(cost.hours)} on {cost.flavor}.",
        file=sys.stderr,
    )
    return (ask or input)("Approve this spend? [y/N] ").strip().lower() in ("y", "yes")


def request_approval(
    cost: CostEstimate,
    budget: Budget,
    run_name: str,
    run_dir: Path,
    timeout_s: int,
    poll_s: int = 2,
    approve_up_to_usd: float | None = None,
    interactive: bool | None = None,
) -> Approval:
    """Decide, in order: refuse above max_usd; approve under auto_approve_usd; approve under a
    pre-approval given on the command line; otherwise ask. With a Prefect server the flow
    pauses for the typed `ApprovalInput` (UI form, `flows.approve`, REST API) until
    `timeout_s`; without one, an interactive terminal is asked and anything else fails fast
    saying how to approve."""
    decision = auto_decision(cost, budget)
    if decision is not None:
        return decision
    if approve_up_to_usd is not None:
        return pre_approved(cost, budget, approve_up_to_usd)
    if not has_api_server():
        return asked_at_terminal(cost, budget, run_name, interactive)
    return asked_through_prefect(cost, budget, run_name, run_dir, timeout_s, poll_s)


def pre_approved(cost: CostEstimate, budget: Budget, approve_up_to_usd: float) -> Approval:
    """--approve-up-to: approved when the estimate's high end is within it, refused otherwise."""
    if cost.usd_high <= approve_up_to_usd:
        return Approval(
            approved=True,
            by="command line",
            max_usd=budget.max_usd,
            estimated_usd=cost.usd,
            reason=f"pre-approved up to {usd(approve_up_to_usd)} (--approve-up-to)",
        )
    raise NotApproved(
        f"the estimate reaches {usd(cost.usd_high)}, above --approve-up-to {usd(approve_up_to_usd)}; "
        "raise it to approve this run"
    )


def asked_at_terminal(cost: CostEstimate, budget: Budget, run_name: str, interactive: bool | None) -> Approval:
    """No server to pause on: a person at a terminal answers; anything else is told how to approve."""
    if not (interactive if interactive is not None else sys.stdin.isatty()):
        raise NotApproved(how_to_approve(run_name, cost))
    if not _terminal_prompt(run_name, cost):
        raise NotApproved("declined at the terminal")
    return Approval(
        approved=True,
        by="terminal",
        reason="approved at the terminal",
        max_usd=budget.max_usd,
        estimated_usd=cost.usd,
    )


def asked_through_prefect(
    cost: CostEstimate, budget: Budget, run_name: str, run_dir: Path, timeout_s: int, poll_s: int
) -> Approval:
    """The flow pauses for the typed answer (UI form, `flows.approve`, REST API) until timeout_s."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.logging import get_run_logger

    description = (
        f"Run `{run_name}` is estimated at {usd(cost.usd)} (range {usd(cost.usd_low)}-{usd(cost.usd_high)}), "
        f"{duration(cost.hours)} on {cost.flavor}; above auto_approve_usd {usd(budget.auto_approve_usd)}. "
        f"Approve to start it; it stops unapproved after {timeout_s} s."
    )
    if cost.basis.startswith("TOKENS ESTIMATED"):
        description += " Token counts are ESTIMATED (the tokenizer cannot encode): the cost may be far off."
    _record_pause(
        run_dir,
        run_name,
        kind="spend",
        question=description,
        estimated_usd=cost.usd,
        estimated_usd_high=cost.usd_high,
        max_usd=budget.max_usd,
    )
    logger = get_run_logger()
    logger.warning(
        f"run '{run_name}' waits up to {timeout_s} s for approval of {usd(cost.usd)} (up to {usd(cost.usd_high)}). "
        f"Answer in the Prefect UI (the paused run's Resume form), with `python -m flows.approve {run_name}` (or "
        "`--reject`), or over the REST API: POST /flow_runs/<id>/resume "
        '{"run_input": {"approve": true, "reason": "..."}}'
    )
    try:
        answer = pause_flow_run(
            wait_for_input=ApprovalInput.with_initial_data(description=description, max_usd=budget.max_usd),
            timeout=timeout_s,
            poll_interval=poll_s,
            key=f"approve-{run_name}",
        )
    except FlowPauseTimeout:
        logger.warning(f"run '{run_name}': nobody answered within {timeout_s} s; it stops unapproved")
        raise NotApproved(f"no approval within {timeout_s} s; the run was not started") from None
    decision = decision_from_input(answer, cost, budget)
    logger.info(f"run '{run_name}' approved by a person: {decision.reason} (spending cap {usd(decision.max_usd)})")
    return decision


def _record_pause(run_dir: Path, run_name: str, kind: str, question: str, **numbers: float | None) -> None:
    """Says what the run waits for where every door can read it: approval.json in the run
    folder (for `flows.approve <run-name>`), and a flow run input on the server (for REST
    clients, the MCP server and remote workers, which do not share the folder)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    form = ApprovalInput if kind == "spend" else PublishDecision
    pending = PendingDecision(
        kind=kind,
        run=run_name,
        flow_run_id=str(ctx.flow_run.id),
        question=question,
        answer_fields={name: f.description or "" for name, f in form.model_fields.items()},
        answer_cli=f"python -m flows.approve {run_name}"
        + (" [--reject]" if kind == "spend" else " --publish|--reject"),
        **numbers,
    )
    (run_dir / "approval.json").write_text(pending.model_dump_json(indent=2))
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    key = PENDING_INPUT_KEY.format(kind=kind)
    with get_client(sync_client=True) as client:
        try:
            client.create_flow_run_input(ctx.flow_run.id, key=key, value=pending.model_dump_json())
        except PrefectHTTPStatusError as e:
            if e.response.status_code != 409:
                raise
            # the same flow run pausing again (a retry): the newest numbers win
            client.delete_flow_run_input(ctx.flow_run.id, key=key)
            client.create_flow_run_input(ctx.flow_run.id, key=key, value=pending.model_dump_json())


def request_publish_decision(
    why: str, run_name: str, run_dir: Path, timeout_s: int, poll_s: int = 2, interactive: bool | None = None
) -> str:
    """A regression beyond the spec's threshold stops the publish, unless a person says to go
    on: through a pause with the typed `PublishDecision` form when a Prefect server is there
    (UI, `flows.approve RUN --publish`, REST), or at an interactive terminal. Returns the
    decision to record; raises PublishStopped otherwise."""
    if not has_api_server():
        if interactive if interactive is not None else sys.stdin.isatty():
            print(f"\n{why}", file=sys.stderr)
            if input("Publish this model anyway? [y/N] ").strip().lower() in ("y", "yes"):
                return "published anyway: decided at the terminal"
        raise PublishStopped(why)
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.logging import get_run_logger

    _record_pause(run_dir, run_name, kind="publish", question=why)
    get_run_logger().warning(
        f"run '{run_name}' waits up to {timeout_s} s for a decision: {why}. Answer in the Prefect UI (Resume), with "
        f"`python -m flows.approve {run_name} --publish` (or `--reject`), or over the REST API "
        '(POST /flow_runs/<id>/resume {"run_input": {"publish": true, "reason": "..."}})'
    )
    try:
        answer = pause_flow_run(
            wait_for_input=PublishDecision.with_initial_data(description=why),
            timeout=timeout_s,
            poll_interval=poll_s,
            key=f"publish-{run_name}",
        )
    except FlowPauseTimeout:
        raise PublishStopped(f"{why} (nobody decided within {timeout_s} s)") from None
    if not answer.publish:
        raise PublishStopped(f"{why} (declined{': ' + answer.reason if answer.reason else ''})")
    return f"published anyway: {answer.reason or 'a person decided to'}"
