"""Refusals a user can act on, told without a Python traceback.

Every error class whose message already says what went wrong and how to fix it (a bad spec,
bad data, a missing model, a budget, a refused token) derives from `UserFacingError`. The
Prefect engines log a failed flow or task with its traceback; for these errors the
traceback says nothing the message does not, so a logging filter drops it (the message
stays, and real bugs keep their tracebacks).
"""

from __future__ import annotations

import logging


class UserFacingError(Exception):
    """An expected refusal whose message is the whole story: what, where, how to fix."""


class _DropTracebackOfRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserFacingError) or isinstance(getattr(exc, "__cause__", None), UserFacingError):
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _DropTracebackOfRefusals()


def quiet_refusals() -> None:
    """Install the filter on the loggers Prefect's flow and task engines write to."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


# One stable code per kind of refusal, for agents (CLI --json, and later the MCP tools): the
# message says what and where; the code says which kind, and the fix what usually helps.
ERROR_CODES: dict[str, tuple[str, str]] = {
    "SpecError": ("spec_invalid", "correct the named field of the spec (the message lists what is allowed)"),
    "DatasetLoadError": ("dataset_unreadable", "check the dataset path or Hub id, its format and the split"),
    "DatasetValidationError": ("dataset_invalid", "fix the named rows and columns, or map columns with `columns:`"),
    "ConversionError": ("dataset_conversion", "pick the conversion `python -m flows.inspect DATASET` suggests"),
    "ModelSourceError": ("model_unreadable", "give 'tiny', an existing model folder or a Hub id that is reachable"),
    "RewardError": ("reward_invalid", "fix the named reward function (it is called on real rows before any spend)"),
    "TaskError": ("eval_task_invalid", "fix the task YAML: local data files, no include: or !function"),
    "HardwareError": ("nothing_fits", "use LoRA or QLoRA, a shorter max_length, another flavor or a larger budget"),
    "CatalogueError": ("flavor_invalid", "complete the flavor in `flavors:` or FINETUNE_FLAVORS_FILE"),
    "BudgetExceeded": ("budget_exceeded", "raise budget.max_usd, shorten the run, or pick cheaper hardware"),
    "NotApproved": ("not_approved", "approve the spend (flows.approve, the UI form, --approve-up-to) or lower it"),
    "RunLocked": ("run_busy", "wait for the other flow of this run name to finish, or choose another name"),
    "BackendError": ("backend_refused", "fix the token, namespace or billing the message names"),
    "JobFailed": ("job_failed", "read the job's last log lines in the message; the run resumes from its checkpoint"),
    "PublishStopped": ("regression", "check data and learning rate, answer the pause, or set max_regression: null"),
    "GgufError": ("gguf_failed", "drop the named GGUF type, or set outputs.gguf_strict: false"),
    "ConverterUnavailable": (
        "gguf_converter_missing",
        "run `python -m tasks.export.gguf_converter` (make install does)",
    ),
    "PublishError": ("publish_failed", "check the target repo or folder and the token's write access"),
    "DebugSwitchRefused": ("debug_refused", "unset HF_DEBUG while a token is in use"),
    "OutputsChanged": ("outputs_changed", "a stage's files changed on disk; run again to rebuild them"),
    "ServerUnreachable": ("no_server", "start `prefect server start` and point PREFECT_API_URL (or --api-url) at it"),
    "DeploymentNotFound": (
        "no_deployment",
        "run `python -m deployments.serve`, or `prefect deploy --all` and a worker",
    ),
    "AnswerRefused": ("answer_refused", "answer only a paused run, within the spec's budget.max_usd"),
}


def error_payload(error: BaseException) -> dict[str, str]:
    """The JSON an agent gets for a failure: a stable code, the message and a suggested fix."""
    code, fix = next(
        (ERROR_CODES[k.__name__] for k in type(error).__mro__ if k.__name__ in ERROR_CODES),
        ("internal_error" if not isinstance(error, UserFacingError) else "refused", "see the message"),
    )
    if code == "not_approved" and "no approval within" in str(error):
        code, fix = "approval_timed_out", "answer the pause sooner, or raise --approval-timeout"
    return {"code": code, "type": type(error).__name__, "error": str(error), "fix": fix}
