"""The record of one run: every stage's outcome, kept where the stage ends, and the report
written from it however the run ends (finished, a dry run, or failed at some stage).

This is the one place outcomes are recorded: a flow opens `record.stage(name)` around each
stage, and a stage that raises is recorded failed there, the stages after it "not run".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.atomic import write_text
from tasks.core.errors import error_payload
from tasks.core.models import RunPlan, RunSummary, StageOutcome, StageStatus
from tasks.core.money import usd
from tasks.report.render import summary_markdown
from tasks.run.training import TrainingFailed
from tasks.stages import artifacts

PLAN_STAGES = ("validate_dataset", "select_hardware", "estimate_cost", "build_script")
RUN_STAGES = (
    "check_account",
    "approve",
    "submit_job",
    "monitor",
    "fetch_artifacts",
    "evaluate",
    "convert_gguf",
    "smoke_test_gguf",
    "push_to_hub",
)


@dataclass
class Step:
    """What one stage reports: a status and a detail, or the outcome the stage returned itself."""

    status: StageStatus = "passed"
    detail: str = ""
    outcome: StageOutcome | None = None

    def reported(self, outcome: StageOutcome, from_cache: bool) -> None:
        """The stage's own outcome; taken from the cache, it says so."""
        if from_cache and outcome.status == "passed":
            outcome = outcome.model_copy(
                update={"status": "cached", "detail": f"{outcome.detail} (from an earlier run)"}
            )
        self.outcome = outcome


class RunRecord:
    """Outcomes in the order the stages ran, and the summary's fields (job, result, ...)."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.stages: list[StageOutcome] = plan_outcomes(plan)
        self.fields: dict[str, Any] = {}
        self.current = ""

    def add(self, stage: str, status: StageStatus, detail: str = "") -> None:
        self.stages.append(StageOutcome(stage=stage, status=status, detail=detail))

    @contextmanager
    def stage(self, name: str) -> Iterator[Step]:
        """Around one stage: its outcome is what the body sets on the step (passed unless it
        says otherwise); a failure inside is recorded against it by `reporting`."""
        self.current = name
        step = Step()
        yield step
        outcome = step.outcome or StageOutcome(stage=name, status=step.status, detail=step.detail)
        self.stages.append(outcome)

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """Around the run's stages: a failure is recorded at its stage, the rest "not run", the
        report written, and the error the user should see re-raised."""
        try:
            yield
        except Exception as raised:
            error = self.failed(raised)
            payload = error_payload(error)
            self.fields.update(error_code=payload["code"], error_fix=payload["fix"])
            self.finish(f"{self.current}: {error}")
            raise error from None

    def failed(self, e: Exception) -> Exception:
        """Record the failure (training says which of its parts failed); returns the error to show."""
        if isinstance(e, TrainingFailed):
            self.current = e.stage
            if e.job is not None:
                self.fields["job"] = e.job
            if e.submitted:
                self.add("submit_job", "passed", e.submitted)
            e = e.__cause__ if isinstance(e.__cause__, Exception) else e
        if not self.stages or self.stages[-1].stage != self.current:
            job = self.fields.get("job")
            detail = job.detail if self.current == "monitor" and job is not None else f"{type(e).__name__}: {e}"
            self.add(self.current, "failed", detail)
        done = {s.stage for s in self.stages}
        self.stages += [StageOutcome(stage=s, status="not run") for s in RUN_STAGES if s not in done]
        return e

    def dry_run(self) -> RunSummary:
        self.stages += [StageOutcome(stage=s, status="not run", detail="dry run") for s in RUN_STAGES]
        return self.finish(None)

    def finish(self, error: str | None) -> RunSummary:
        """The summary, written as report.md and report.json and shown as an artifact."""
        plan = self.plan
        summary = RunSummary(
            run_name=plan.run_name,
            run_dir=plan.run_dir,
            plan=plan,
            stages=self.stages,
            outputs=outputs(plan, self.fields),
            error=error,
            **self.fields,
        )
        run_dir = Path(plan.run_dir)
        md = summary_markdown(summary)
        write_text(run_dir / "report.md", md)
        write_text(run_dir / "report.json", summary.model_dump_json(indent=2))
        artifacts.markdown(artifacts.artifact_key("report", plan.run_name), md, description="run report")
        return summary


def plan_outcomes(plan: RunPlan) -> list[StageOutcome]:
    d, h, c = plan.dataset, plan.hardware, plan.cost
    details = {
        "validate_dataset": f"{d.rows} rows, format {d.format}, {len(d.warnings)} warning(s)",
        "select_hardware": f"{h.flavor}, LoRA {'on' if h.use_lora else 'off'}, peak ~{h.estimated_peak_memory_gb:.2f} GB",
        "estimate_cost": f"{usd(c.usd)} (range {usd(c.usd_low)}-{usd(c.usd_high)}), ~{c.hours * 60:.1f} min",
        "build_script": plan.script.path,
    }
    return [StageOutcome(stage=s, status="passed", detail=details[s]) for s in PLAN_STAGES]


def outputs(plan: RunPlan, fields: dict[str, Any]) -> dict[str, str]:
    """Where each output of the run is, for the report's first lines."""
    run_dir = Path(plan.run_dir)
    out = {
        "run folder": str(run_dir),
        "spec": str(run_dir / "spec.yaml"),
        "plan": str(run_dir / "plan.json"),
        "script": plan.script.path,
        "data": plan.dataset.prepared_path,
    }
    if (run_dir / "logs" / "train.log").exists():
        out["log"] = str(run_dir / "logs" / "train.log")
    if (run_dir / "trackio").exists():
        out["metrics"] = str(run_dir / "trackio")
    result = fields.get("result")
    if result is not None:
        out["model"] = result.model_dir
        if result.adapter_dir:
            out["adapter"] = result.adapter_dir
    gguf = fields.get("gguf")
    if gguf is not None and gguf.files:
        out["gguf"] = str(Path(gguf.files[0].path).parent)
    out["report"] = str(run_dir / "report.md")
    return out
