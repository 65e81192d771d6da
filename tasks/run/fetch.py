"""Bring the trained model into the run folder and check that it is whole.

The backend brings the outputs in (the local script already wrote into the run folder; a
Hugging Face job pushed them to its staging repo); then the same check for every backend:
the model (LoRA merged) has its config, safetensors and tokenizer files, and the final
metrics are collected.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.errors import UserFacingError
from tasks.core.manifest import record
from tasks.core.models import JobHandle, JobResult, JobStatus, TrainingMeasurement
from tasks.run.backends.base import Backend


class JobFailed(UserFacingError, RuntimeError):
    """The job did not produce a model; the message carries its state and log tail."""


def fetch_artifacts(backend: Backend, handle: JobHandle, status: JobStatus) -> JobResult:
    run_dir = Path(handle.run_dir)
    if status.state != "completed":
        raise JobFailed(f"job {handle.job_id} {status.state}: {status.detail}")
    backend.fetch(handle)
    result_path = run_dir / "train_result.json"
    if not result_path.exists():
        raise JobFailed(f"job {handle.job_id} ended without {result_path.name}; see {handle.log_path}")
    result = json.loads(result_path.read_text())
    model_dir = run_dir / result["model_dir"]
    needed = ["config.json", "tokenizer_config.json"]
    missing = [n for n in needed if not (model_dir / n).exists()]
    if not list(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise JobFailed(f"the trained model in {model_dir} is incomplete: missing {', '.join(missing)}")
    adapter_dir = run_dir / result["adapter_dir"] if result.get("adapter_dir") else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").exists():
        raise JobFailed(f"LoRA was used but {adapter_dir} holds no adapter_config.json")
    files = sorted(
        str(p.relative_to(run_dir)) for d in (model_dir, adapter_dir) if d for p in d.rglob("*") if p.is_file()
    )
    size = sum((run_dir / f).stat().st_size for f in files)
    metrics = {k: float(v) for k, v in result.get("metrics", {}).items() if isinstance(v, int | float)}
    return JobResult(
        model_dir=str(model_dir),
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        files=files,
        size_mb=round(size / 1e6, 3),
        train_metrics=metrics,
        manifest=record(run_dir, [d for d in (model_dir, adapter_dir) if d is not None]),
        measured=TrainingMeasurement.model_validate(result["measured"]) if result.get("measured") else None,
    )
