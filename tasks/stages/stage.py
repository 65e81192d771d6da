"""A lifecycle stage: a plain function, wrapped by a Prefect task.

Inside a flow run, calling a stage runs its task (a task run in the UI, retries, result
persistence); outside one (`--dry-run`, a test, a notebook) it calls the plain function, so
planning needs no Prefect server. The choice is made here, once, rather than by each caller.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

from prefect import get_run_logger, task
from prefect.context import FlowRunContext
from prefect.tasks import Task

P = ParamSpec("P")
R = TypeVar("R")


class Stage(Generic[P, R]):
    """A stage's plain function (`fn`) and its Prefect task (`task`); calling it picks one."""

    def __init__(self, fn: Callable[P, R], **options: Any) -> None:
        self.fn = fn
        self.task: Task[P, R] = task(**options)(fn)
        self.name = self.task.name
        self.__doc__ = fn.__doc__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if FlowRunContext.get() is None:
            return self.fn(*args, **kwargs)
        return self.task(*args, **kwargs)

    def with_options(self, **options: Any) -> Task[P, R]:
        return self.task.with_options(**options)


def stage(**options: Any) -> Callable[[Callable[P, R]], Stage[P, R]]:
    """`@stage(name=..., retries=..., cache_policy=...)`: Prefect's task options."""

    def wrap(fn: Callable[P, R]) -> Stage[P, R]:
        return Stage(fn, **options)

    return wrap


def say(message: str) -> None:
    """A line in the run's log: Prefect's logger inside a run, stderr outside one."""
    try:
        get_run_logger().info(message)
    except Exception:  # called outside a run
        print(message, file=sys.stderr)
