"""The one interface every backend implements, and the request it receives.

The pipeline only talks to this interface: it never asks which backend it has. A backend
says whether it runs on this machine (planning then sizes this machine instead of a rented
flavor), what it must upload first, how to check credentials before anything is spent,
and how to submit, follow, cancel and collect a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from tasks.core.errors import UserFacingError
from tasks.core.models import CostEstimate, InputUpload, JobHandle, JobSnapshot, TrainingScript
from tasks.core.money import usd
from tasks.core.spec import BackendSettings


class BackendError(UserFacingError, RuntimeError):
    """The backend refused or could not do what was asked; the message says what to fix."""


class JobRequest(BaseModel):
    """Everything a backend needs to start one job of a run."""

    model_config = ConfigDict(frozen=True)

    run_name: str
    run_dir: str
    script: TrainingScript
    model_path: str
    flavor: str
    timeout_s: int
    push_model_to: str | None = None
    private: bool = True
    attempt: int = 1
    flow_run_id: str | None = None
    training_key: str | None = None  # checkpoints made from other inputs are never resumed
    baseline_path: str | None = None  # a model the evaluation also compares with (a recipe's base)
    processes: int = 1  # training processes of the plan (one per GPU), every node's
    nodes: int = 1  # machines the plan spans (backend: kubernetes)
    gpus_per_node: int = 0  # each node's GPUs (0 on a CPU)
    settings: BackendSettings | None = None  # the spec's block for the backend (pool:, kubernetes:)


class Account(BaseModel):
    """Who will pay, checked before anything is uploaded or submitted."""

    model_config = ConfigDict(frozen=True)

    namespace: str | None
    price_per_hour_usd: float | None = None
    price_source: str = "catalogue"


class Backend(Protocol):
    name: str
    on_this_machine: bool
    poll_s: float  # how often the monitor asks for the job's state and log

    def model_reference(self, model_path: str, slot: str = "model") -> str:
        """How the script names a model where it runs (a local folder may be uploaded): the
        model it trains (slot "model") or the one its evaluation also compares with ("baseline")."""
        ...

    def planned_inputs(self, run_dir: Path, model_path: str, baseline_path: str | None = None) -> InputUpload | None:
        """What must be uploaded before the job can start, with size and time; None if nothing."""
        ...

    def preflight(self, flavor: str) -> Account:
        """Credentials, namespace and price, checked before any upload or spend."""
        ...

    def find_live(self, request: JobRequest) -> JobHandle | None:
        """A job of this run (same attempt) that is still alive or finished, to re-attach to."""
        ...

    def submit(self, request: JobRequest) -> JobHandle: ...

    def status(self, handle: JobHandle) -> JobSnapshot: ...

    def read_log(self, handle: JobHandle, start: int) -> list[str]:
        """The job's log lines from line `start` on (0-based); also kept in logs/train.log."""
        ...

    def logs(self, handle: JobHandle, tail: int = 50) -> str: ...

    def cancel(self, handle: JobHandle) -> None: ...

    def fetch(self, handle: JobHandle) -> None:
        """Bring model/, adapter/, trackio/ and train_result.json into the run folder."""
        ...


def save_handle(handle: JobHandle) -> None:
    path = Path(handle.run_dir) / "job.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(handle.model_dump_json(indent=2))
    tmp.replace(path)


def load_handle(run_dir: Path) -> JobHandle | None:
    path = run_dir / "job.json"
    return JobHandle.model_validate_json(path.read_text()) if path.exists() else None


def files_of(folder: Path) -> list[Path]:
    """A model folder's files, without the caches a download leaves beside them."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)


# what the script imports (its siblings, the GRPO reward modules) travels with it
JOB_FILES = (
    "train.py",
    "finetune_eval.py",
    "finetune_callbacks.py",
    "finetune_vision.py",
    "finetune_attention.py",
    "finetune_probe.py",
    "accelerate.yaml",
    "data/train.jsonl",
    "data/heldout.jsonl",
)
# the spec's reward files (GRPO, RLOO); the checked images of vision rows, and of an evaluation set's
JOB_FOLDERS = ("finetune_rewards", "data/images", "data/evaluation/images")


def job_inputs(
    run_dir: Path, model_path: str, baseline_path: str | None = None
) -> tuple[list[tuple[Path, str]], list[str]]:
    """What a job that cannot see this disk needs, each file with its name next to the script
    (a local model folder goes under inputs/model, a baseline under inputs/baseline), and the
    same as lines for a person."""
    files = [(run_dir / name, name) for name in JOB_FILES if (run_dir / name).exists()]
    items = [name for _, name in files]
    for folder in JOB_FOLDERS:
        found = files_of(run_dir / folder) if (run_dir / folder).is_dir() else []
        files += [(p, p.relative_to(run_dir).as_posix()) for p in found]
        items += [f"{folder}/ ({len(found)} files)"] if found else []
    evals = sorted(p for p in (run_dir / "evals").rglob("*") if p.is_file())
    if evals:
        files += [(p, p.relative_to(run_dir).as_posix()) for p in evals]
        items.append(f"task evaluation data ({len(evals)} files)")
    for slot, folder in (("model", model_path), ("baseline", baseline_path)):
        if folder is not None and Path(folder).is_dir():
            found = files_of(Path(folder))
            files += [(p, f"inputs/{slot}/{p.relative_to(folder).as_posix()}") for p in found]
            items.append(f"{'model' if slot == 'model' else 'baseline model'} folder {folder} ({len(found)} files)")
    return files, items


SHARED_STORAGE_BYTES_PER_S = 100e6  # an assumption: a pool's or a cluster's shared storage


def uploaded_model_reference(model_path: str, slot: str = "model") -> str:
    """How a job that cannot see this disk names a model: a local folder goes up with the job,
    under inputs/<slot> next to the script; a Hub id is read where the job runs."""
    return f"inputs/{slot}" if Path(model_path).is_dir() else model_path


def planned_upload(
    run_dir: Path,
    model_path: str,
    baseline_path: str | None,
    destination: str,
    bytes_per_s: float,
    overhead_s: float = 0.0,
) -> InputUpload:
    """What a remote job's inputs weigh and how long sending them takes, before it can start."""
    files, items = job_inputs(run_dir, model_path, baseline_path)
    size = sum(p.stat().st_size for p, _ in files)
    return InputUpload(
        destination=destination,
        files=len(files),
        bytes=size,
        seconds=round(overhead_s + size / bytes_per_s, 1),
        items=items,
    )


def tail_lines(lines: list[str], tail: int) -> str:
    clean = [line for line in (x.rstrip() for x in lines) if line.strip()]
    return "\n".join(clean[-tail:])


def account_detail(account: Account, cost: CostEstimate) -> str:
    """What check_account found, as the run's report shows it."""
    if account.namespace is None:
        return "this machine: nothing to check"
    return (
        f"namespace {account.namespace}; {cost.flavor} at {usd(cost.price_per_hour_usd)}/h from "
        f"{account.price_source}; estimate {usd(cost.usd)} (up to {usd(cost.usd_high)})"
    )
