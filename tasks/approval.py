"""Stage 4: decide whether the estimated spend may go ahead.

Under `budget.auto_approve_usd` the run is approved automatically and the reason recorded;
above `budget.max_usd` it is refused before anyone is asked; in between a person (or an
agent) must answer. The asking is Prefect's `pause_flow_run(wait_for_input=...)`, done by
the flow (pauses belong to flow runs, not tasks) with `ApprovalInput` as the typed form.
"""

from __future__ import annotations

from prefect.input import RunInput

from tasks.models import Approval, CostEstimate
from tasks.spec import Budget


class BudgetExceeded(RuntimeError):
    """The estimate is above max_usd: refused without asking."""


class NotApproved(RuntimeError):
    """A person declined the run, or nobody answered before the timeout."""


class ApprovalInput(RunInput):
    """The form shown in the Prefect UI (and accepted over the REST API) at the pause."""

    approve: bool = False
    reason: str = ""
    max_usd: float | None = None


def auto_decision(cost: CostEstimate, budget: Budget) -> Approval | None:
    """An automatic decision, or None when a person must decide.

    Compared against the high end of the estimate's range, so a run is only waved
    through when even its pessimistic cost is under the threshold.
    """
    if cost.usd > budget.max_usd:
        raise BudgetExceeded(
            f"estimated cost ${cost.usd:.2f} (range ${cost.usd_low:.2f}-${cost.usd_high:.2f}) is above "
            f"budget.max_usd ${budget.max_usd:.2f}; raise max_usd, shorten the run, or pick cheaper hardware"
        )
    if cost.usd_high <= budget.auto_approve_usd:
        return Approval(
            approved=True,
            by="auto",
            reason=(f"estimated ${cost.usd_high:.2f} at most, within auto_approve_usd ${budget.auto_approve_usd:.2f}"),
            max_usd=budget.max_usd,
            estimated_usd=cost.usd,
        )
    return None


def decision_from_input(answer: ApprovalInput, cost: CostEstimate, budget: Budget) -> Approval:
    if not answer.approve:
        raise NotApproved(f"the run was declined{': ' + answer.reason if answer.reason else ''}")
    max_usd = answer.max_usd if answer.max_usd is not None else budget.max_usd
    if cost.usd > max_usd:
        raise NotApproved(f"approved max_usd ${max_usd:.2f} is below the estimate ${cost.usd:.2f}")
    return Approval(
        approved=True,
        by="user",
        reason=answer.reason or "approved",
        max_usd=max_usd,
        estimated_usd=cost.usd,
    )
