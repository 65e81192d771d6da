"""Prefect artifacts when running under Prefect; nothing when a stage is called directly."""

from __future__ import annotations

from typing import Any


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def markdown(key: str, text: str, description: str = "") -> None:
    if _in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=key, markdown=text, description=description or None)


def table(key: str, rows: list[dict[str, Any]], description: str = "") -> None:
    if _in_prefect_run() and rows:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description or None)


class ProgressBar:
    """One Prefect progress artifact, created on first use and updated after."""

    def __init__(self, key: str, description: str) -> None:
        self.key, self.description = key, description
        self.artifact_id = None

    def update(self, percent: float) -> None:
        if not _in_prefect_run():
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = max(0.0, min(100.0, percent))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=percent, key=self.key, description=self.description)
        else:
            update_progress_artifact(artifact_id=self.artifact_id, progress=percent)


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]
