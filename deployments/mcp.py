"""The engine for coding agents, as an MCP server over stdio: `python -m deployments.mcp`.

An agent validates a dataset and plans a run here (nothing needs a server for those), then
starts the run on the Prefect server's deployments, follows it, and relays a pending spend to
its user: a paused run reads "needs approval: estimated $X", and `approve_run` refuses a cap
above the spec's budget.max_usd. Runs go through the same REST calls as `deployments.client`.

    python -m deployments.mcp [--api-url URL] [--serve]

--api-url defaults to PREFECT_API_URL, else http://127.0.0.1:4200/api (`prefect server
start`). --serve also serves the deployments from this process (`deployments.serve`), so a
server plus this command is the whole set-up. Every tool returns typed JSON; a failure is an
error result whose JSON carries a stable `code`, the message and a `fix` (docs/errors.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parent.parent
DEFAULT_API_URL = "http://127.0.0.1:4200/api"

# stdout is the protocol's wire: everything this process logs goes to stderr
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

from mcp.server.mcpserver import MCPServer  # noqa: E402
from mcp.types import CallToolResult, TextContent  # noqa: E402

from deployments.client import ArtifactView, RunRef, RunStatus, connect  # noqa: E402
from tasks.core.errors import error_payload  # noqa: E402
from tasks.core.methods import METHODS  # noqa: E402
from tasks.core.models import DatasetReport  # noqa: E402
from tasks.core.money import duration, usd  # noqa: E402
from tasks.stages.approval import PendingDecision  # noqa: E402

SpecArg = Annotated[
    dict[str, Any],
    Field(
        description="a run spec as JSON, the same fields as a YAML spec (docs/spec.md): method, model, "
        "dataset (an absolute path, or relative to the engine's checkout), training, budget, outputs, ...; "
        "or a recipe: model, budget, defaults and `stages`, a list of such specs run in order"
    ),
]
RunIdArg = Annotated[str, Field(description="the flow run id that start_run returned")]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatasetCheck(_Out):
    ok: bool = Field(description="the dataset passed the method's schema")
    summary: str
    report: DatasetReport


class PlanResult(_Out):
    run_name: str
    summary: str = Field(description="one line to show the user: flavor, time, estimated cost, approval")
    estimated_usd: float
    estimated_usd_high: float
    hours: float
    flavor: str
    needs_approval: bool = Field(description="above budget.auto_approve_usd: the run will pause for the user's answer")
    max_usd: float = Field(description="the spec's hard cap; the run is refused above it")
    plan: dict[str, Any] = Field(description="the whole plan, as `--dry-run --json` prints it")


class StartedRun(_Out):
    run: RunRef
    next: str = Field(description="what to call next")


class RunDetail(_Out):
    status: RunStatus
    local: dict[str, Any] | None = Field(
        None, description="step, loss and cost so far, read from the run folder when this machine has it"
    )


class Answered(_Out):
    answered: PendingDecision = Field(description="the question that was answered")
    approve: bool


class LogLines(_Out):
    lines: list[str]


class Results(_Out):
    status: RunStatus
    report_markdown: str | None = Field(None, description="the run report, once written")
    report: dict[str, Any] | None = Field(None, description="report.json (outputs, evaluation, GGUF files, costs)")
    artifacts: list[ArtifactView]


def _ok(model: BaseModel) -> CallToolResult:
    data = model.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data))], structured_content=data)


def _failed(error: BaseException) -> CallToolResult:
    payload = error_payload(error)
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(payload))], structured_content=payload, is_error=True
    )


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL


def _spec(data: dict[str, Any]) -> Any:
    """A run spec, or a recipe (a mapping with `stages`), paths relative to the engine's checkout."""
    from tasks.core.recipe import parse_recipe
    from tasks.core.spec import parse_spec, resolve_spec_paths

    if isinstance(data, dict) and "stages" in data:
        return parse_recipe(data, "the spec argument", base=REPO)
    return parse_spec(resolve_spec_paths(data, REPO), "the spec argument")


def _plan_recipe(recipe: Any) -> PlanResult:
    """Every stage planned and priced, the chain refused over its budget: what `flows.recipe --dry-run` says."""
    from flows.recipe import check_total, plan_stages, recipe_name_of

    name = recipe_name_of(recipe)
    plans = plan_stages(recipe, name)
    check_total(recipe, plans)
    low, high = sum(p.cost.usd for p in plans), sum(p.cost.usd_high for p in plans)
    hours, budget = sum(p.cost.hours for p in plans), recipe.budget
    needs = high > budget.auto_approve_usd
    stages = ", ".join(f"{s.name} ({s.method}) {usd(p.cost.usd)}" for s, p in zip(recipe.stages, plans, strict=True))
    summary = (
        f"{name}: {len(plans)} stages, {stages}; {duration(hours)} in all, estimated {usd(low)} (up to {usd(high)}, "
        f"cap {usd(budget.max_usd)}); "
        + ("each stage over what is left of auto_approve_usd asks the user" if needs else "auto-approved")
    )
    return PlanResult(
        run_name=name,
        summary=summary,
        estimated_usd=low,
        estimated_usd_high=high,
        hours=hours,
        flavor=", ".join(dict.fromkeys(p.cost.flavor for p in plans)),
        needs_approval=needs,
        max_usd=budget.max_usd,
        plan={"stages": [p.model_dump(mode="json") for p in plans]},
    )


def _local_state(name: str) -> dict[str, Any] | None:
    from tasks.core.rundir import runs_root
    from tasks.run.jobs import run_state

    folder = runs_root() / name
    if not folder.is_dir():
        return None
    info = run_state(folder)
    info.pop("job", None)
    return info


_served: subprocess.Popen | None = None  # the deployments this process serves (--serve)


def _wait_for_served(api: Any, method: str, timeout_s: float = 90) -> None:
    """With --serve, the deployments appear some seconds after the first tool call can come."""
    import time

    from deployments.client import DeploymentNotFound

    deadline = time.monotonic() + timeout_s
    while _served is not None and _served.poll() is None:
        try:
            api.find_deployment(method)
            return
        except DeploymentNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


server = MCPServer(
    "finetune-flow",
    instructions=(
        "Fine-tune a language model: validate_dataset, then plan_run and show the user the plan and its cost; "
        "start_run only after that. A run above its auto-approval threshold pauses: run_status says "
        "'needs approval, estimated $X'; ask the user, then approve_run or reject with approve=false. Never "
        "approve on your own. Follow with run_status and run_logs; fetch run_results at the end."
    ),
)


@server.tool()
def validate_dataset(
    dataset: Annotated[str, Field(description="a .jsonl/.json/.csv/.parquet file or folder (absolute path)")],
    method: Annotated[str, Field(description=" or ".join(METHODS))],
    model: Annotated[str, Field(description="the model whose tokenizer counts the tokens")] = "tiny",
    columns: Annotated[dict[str, str] | None, Field(description="column mapping, as in the spec")] = None,
    split: str = "train",
    conversion: Annotated[str | None, Field(description="a named conversion, as in the spec")] = None,
    max_length: Annotated[int, Field(description="training.max_length: rows are measured against it")] = 1024,
) -> Annotated[CallToolResult, DatasetCheck]:
    """Check a dataset against a method's schema before anything is planned: the format it is
    in, each method's verdict, token lengths; bad rows are named by row and column."""
    try:
        from tasks.core.methods import method_definition
        from tasks.core.model_source import resolve_model
        from tasks.data.validate import HeldOut
        from tasks.stages.planning import validate_dataset_task

        path = dataset if Path(dataset).is_absolute() else str(REPO / dataset)
        with tempfile.TemporaryDirectory(prefix="finetune-validate-") as tmp:
            report = validate_dataset_task.fn(
                path if Path(path).exists() else dataset,
                method_definition(method),
                resolve_model(model),
                max_length,
                Path(tmp) / "data",
                split,
                dict(columns or {}),
                conversion=conversion,
                held_out=HeldOut(share=0, maximum=0, seed=0),
            )
        summary = (
            f"{report.rows} rows in format {report.format}, mean {report.tokens.mean} tokens per row; "
            f"{report.rows_over_max_length} rows longer than max_length {max_length}"
        )
        return _ok(DatasetCheck(ok=True, summary=summary, report=report))
    except Exception as e:
        return _failed(e)


@server.tool()
def plan_run(spec: SpecArg) -> Annotated[CallToolResult, PlanResult]:
    """Validate, size and price a run (or every stage of a recipe) without starting it (the
    `--dry-run --json` plan). Show the user the summary and the estimate before start_run."""
    try:
        from flows.planning import plan_run as plan

        parsed = _spec(spec)
        if hasattr(parsed, "stages"):
            return _ok(_plan_recipe(parsed))
        found = plan(parsed)
        cost, budget = found.cost, parsed.budget
        needs = cost.usd_high > budget.auto_approve_usd
        summary = (
            f"{found.run_name}: {duration(cost.hours)} on {cost.flavor}, estimated {usd(cost.usd)} "
            f"(up to {usd(cost.usd_high)}, cap {usd(budget.max_usd)}); "
            + ("needs the user's approval" if needs else f"auto-approved under {usd(budget.auto_approve_usd)}")
        )
        return _ok(
            PlanResult(
                run_name=found.run_name,
                summary=summary,
                estimated_usd=cost.usd,
                estimated_usd_high=cost.usd_high,
                hours=cost.hours,
                flavor=cost.flavor,
                needs_approval=needs,
                max_usd=budget.max_usd,
                plan=found.model_dump(mode="json"),
            )
        )
    except Exception as e:
        return _failed(e)


@server.tool()
def start_run(spec: SpecArg) -> Annotated[CallToolResult, StartedRun]:
    """Start the run on the Prefect server (the method's deployment, or for a recipe the recipe
    flow's). Plan it first."""
    try:
        parsed = _spec(spec)
        with connect(_api_url()) as api:
            if hasattr(parsed, "stages"):  # a recipe: the recipe flow's deployment runs it
                _wait_for_served(api, "recipe/recipe")
                run = api.start_run(api.recipe_deployment(), parsed)
            else:
                _wait_for_served(api, parsed.method)
                run = api.start_run(parsed.method, parsed)
        return _ok(StartedRun(run=run, next="run_status until it pauses (ask the user) or ends; then run_results"))
    except Exception as e:
        return _failed(e)


@server.tool()
def run_status(flow_run_id: RunIdArg) -> Annotated[CallToolResult, RunDetail]:
    """Where the run stands: its state, what a pause waits for (with the estimate), progress,
    and step, loss and cost so far."""
    try:
        with connect(_api_url()) as api:
            status = api.status(flow_run_id)
        return _ok(RunDetail(status=status, local=_local_state(status.name)))
    except Exception as e:
        return _failed(e)


@server.tool()
def approve_run(
    flow_run_id: RunIdArg,
    approve: Annotated[bool, Field(description="the user's answer: true approves (or publishes), false stops")],
    reason: Annotated[str, Field(description="who decided and why; recorded in the report")] = "",
    max_usd: Annotated[
        float | None, Field(description="a lower spending cap; above the spec's budget.max_usd it is refused")
    ] = None,
) -> Annotated[CallToolResult, Answered]:
    """Answer a paused run with the USER's decision: the spend (or publishing a model that got
    worse). Only after asking the user."""
    try:
        with connect(_api_url()) as api:
            answered = api.answer(flow_run_id, approve, reason, max_usd)
        return _ok(Answered(answered=answered, approve=approve))
    except Exception as e:
        return _failed(e)


@server.tool()
def run_logs(
    flow_run_id: RunIdArg, limit: Annotated[int, Field(ge=1, le=1000, description="the newest lines")] = 50
) -> Annotated[CallToolResult, LogLines]:
    """The run's newest log lines (stages, the job's progress, errors)."""
    try:
        with connect(_api_url()) as api:
            return _ok(LogLines(lines=api.logs(flow_run_id, limit)))
    except Exception as e:
        return _failed(e)


@server.tool()
def cancel_run(flow_run_id: RunIdArg) -> Annotated[CallToolResult, RunDetail]:
    """Cancel the run: its training job is stopped, its checkpoints stay."""
    try:
        with connect(_api_url()) as api:
            status = api.cancel(flow_run_id)
        return _ok(RunDetail(status=status, local=_local_state(status.name)))
    except Exception as e:
        return _failed(e)


@server.tool()
def run_results(flow_run_id: RunIdArg) -> Annotated[CallToolResult, Results]:
    """The finished run's report (markdown and JSON: outputs, evaluation verdict, GGUF files,
    cost) and its artifacts."""
    try:
        from tasks.core.rundir import runs_root

        with connect(_api_url()) as api:
            status = api.status(flow_run_id)
            markdown = api.report(flow_run_id)
            found = api.artifacts(flow_run_id)
        report_file = runs_root() / status.name / "report.json"
        report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.exists() else None
        return _ok(Results(status=status, report_markdown=markdown, report=report, artifacts=found))
    except Exception as e:
        return _failed(e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.mcp", description=__doc__.split("\n\n")[0])
    p.add_argument("--api-url", help=f"the Prefect server's API (default: PREFECT_API_URL, else {DEFAULT_API_URL})")
    p.add_argument("--serve", action="store_true", help="also serve the deployments from a child process")
    args = p.parse_args(argv)
    os.environ["PREFECT_API_URL"] = args.api_url or _api_url()
    os.chdir(REPO)  # relative dataset paths and runs/ are the checkout's, as for deployments.serve
    global _served
    if args.serve:
        _served = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve"], stdout=sys.stderr, stderr=sys.stderr, start_new_session=True
        )
    try:
        server.run()
    finally:
        if _served is not None:
            _served.terminate()
            _served.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
