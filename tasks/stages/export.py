"""The export stages as Prefect tasks: convert to GGUF, smoke-test the files, publish. Each refuses
files that changed since the stage that wrote them recorded them."""

from __future__ import annotations

from pathlib import Path

from tasks.core.errors import UserFacingError
from tasks.core.models import (
    DatasetReport,
    EvaluationResult,
    GgufFiles,
    JobResult,
    JobStatus,
    PublishedModel,
    RunPlan,
    StageOutcome,
)
from tasks.core.spec import Outputs, RunSpec
from tasks.export.gguf import convert_gguf
from tasks.export.gguf_smoke import smoke_test_all
from tasks.export.gguf_summary import fallback_text, gguf_cells
from tasks.export.hub import push_to_hub
from tasks.stages import artifacts
from tasks.stages.cache import BY_KEY
from tasks.stages.stage import say, stage


class OutputsChanged(UserFacingError, RuntimeError):
    """A file an earlier stage wrote is not as it was recorded."""


def trust_outputs(result: JobResult, gguf: GgufFiles | None) -> None:
    """Refuse to test or publish files that differ from what the stage that wrote them recorded."""
    from tasks.core.manifest import problems
    from tasks.stages.cache import gguf_problems

    run_dir = Path(result.model_dir).parent
    bad = problems(run_dir, result.manifest) + (gguf_problems(gguf) if gguf is not None else [])
    if bad:
        raise OutputsChanged(
            f"{'; '.join(bad[:5])}: these outputs changed after they were written and are not used. "
            "Run the flow again: the stages that made them run again."
        )


@stage(name="convert_gguf", cache_policy=BY_KEY)
def convert_gguf_task(
    result: JobResult, outputs: Outputs, run_dir: Path, run_name: str, cache_key: str | None = None
) -> GgufFiles:
    gguf = convert_gguf(result, outputs, run_dir, run_name)
    say(f"convert_gguf {gguf.outcome.status}: {gguf.outcome.detail}")
    return gguf


@stage(name="smoke_test_gguf", cache_policy=BY_KEY)
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
    say(f"smoke_test_gguf {tested.outcome.status}: {tested.outcome.detail}")
    return tested


@stage(name="push_to_hub", cache_policy=BY_KEY)  # transient HTTP errors are retried inside, with backoff
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
    say(f"push_to_hub {published.outcome.status}: {published.outcome.detail}")
    return published
