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
