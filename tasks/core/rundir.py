"""The run folder: runs/<run-name>/ holds everything a run reads and writes."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import yaml

from tasks.core.atomic import write_text
from tasks.core.spec import RUN_NAME_PATTERN, RunSpec


def runs_root() -> Path:
    """``$FINETUNE_RUNS_DIR`` or ./runs."""
    return Path(os.environ.get("FINETUNE_RUNS_DIR", "runs")).resolve()


def default_run_name(spec: RunSpec, now: datetime | None = None) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", Path(spec.model.rstrip("/")).name.lower()).strip("-")[:32] or "model"
    return f"{spec.method}-{slug}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def spec_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def prepare_run_dir(spec: RunSpec, run_name: str, root: Path | None = None) -> Path:
    """Create the folder and record the spec. Re-using a name continues that run: with the
    same spec it resumes (or reports, when it finished); with a changed spec the earlier one
    is kept as spec.previous.yaml and the stages whose inputs changed run again (a changed
    training sets the earlier model and checkpoints aside in superseded/)."""
    run_dir = (root or runs_root()) / run_name
    text = spec_yaml(spec)
    spec_file = run_dir / "spec.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    if spec_file.exists() and spec_file.read_text() != text:
        write_text(run_dir / "spec.previous.yaml", spec_file.read_text())
    write_text(spec_file, text)
    return run_dir


def named(spec: RunSpec) -> RunSpec:
    """The spec with its run name fixed now (the default one for a spec without a name), so
    that the lock, the run folder and the Prefect flow run all agree on it."""
    if spec.name is not None:
        return spec
    return spec.model_copy(update={"name": _current_flow_run_name(spec) or default_run_name(spec)})


def _current_flow_run_name(spec: RunSpec) -> str | None:
    """The name `flow_run_name` gave this flow run, when it is a default run name."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    name = ctx.flow_run.name if ctx is not None and ctx.flow_run is not None else None
    return name if name and name.startswith(f"{spec.method}-") and RUN_NAME_PATTERN.match(name) else None


def flow_run_name() -> str:
    """The run's own name in the Prefect UI's runs list (Prefect's random one otherwise)."""
    from prefect.runtime import flow_run

    spec = flow_run.parameters.get("spec")
    try:
        spec = spec if isinstance(spec, RunSpec) else RunSpec.model_validate(spec)
    except Exception:  # the flow itself reports a bad spec
        return f"{flow_run.flow_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return spec.name or default_run_name(spec)
