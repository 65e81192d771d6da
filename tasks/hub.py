"""Stage 10: publishing to the Hugging Face Hub.

Not built yet: nothing is uploaded. The stage reports itself as skipped with the reason,
and never reads or prints a token.
"""

from __future__ import annotations

from tasks.models import GgufFiles, JobResult, PublishedModel, StageOutcome
from tasks.spec import Outputs


def push_to_hub(result: JobResult, gguf: GgufFiles, outputs: Outputs) -> PublishedModel:
    if not outputs.hub_repo:
        detail = "outputs.hub_repo is not set; the model stays in the run folder"
    else:
        detail = f"publishing is not available yet; nothing was uploaded to '{outputs.hub_repo}'"
    return PublishedModel(
        outcome=StageOutcome(stage="push_to_hub", status="skipped", detail=detail), repo=outputs.hub_repo
    )
