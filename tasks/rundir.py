"""The run folder: runs/<run-name>/ holds everything a run reads and writes."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import yaml

from tasks.errors import UserFacingError
from tasks.spec import RunSpec


class RunFolderConflict(UserFacingError, ValueError):
    """A run of that name exists with a different spec."""


def runs_root() -> Path:
    """``$FINETUNE_RUNS_DIR`` or ./runs."""
    return Path(os.environ.get("FINETUNE_RUNS_DIR", "runs")).resolve()


def default_run_name(spec: RunSpec, now: datetime | None = None) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", Path(spec.model.rstrip("/")).name.lower()).strip("-")[:32] or "model"
    return f"{spec.method}-{slug}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def spec_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def prepare_run_dir(spec: RunSpec, run_name: str, root: Path | None = None) -> Path:
    """Create the folder and record the spec. Re-using a name is allowed only with the same
    spec (then the run resumes from its checkpoints); anything else would mix two runs."""
    run_dir = (root or runs_root()) / run_name
    text = spec_yaml(spec)
    spec_file = run_dir / "spec.yaml"
    if spec_file.exists() and spec_file.read_text() != text:
        raise RunFolderConflict(
            f"{run_dir} already holds a run with a different spec; choose another `name` or remove that folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(text)
    return run_dir
