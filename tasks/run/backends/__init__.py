"""The backend registry: the only place that maps a backend name to its implementation."""

from __future__ import annotations

from pathlib import Path

from tasks.models import InputUpload, JobHandle, JobSnapshot
from tasks.run.backends.base import (
    Account,
    Backend,
    BackendError,
    JobRequest,
    load_handle,
    save_handle,
)
from tasks.run.backends.hf_jobs import HfJobsBackend
from tasks.run.backends.local import LocalBackend

__all__ = [
    "Account",
    "Backend",
    "BackendError",
    "JobRequest",
    "get_backend",
    "runs_on_this_machine",
    "load_handle",
    "save_handle",
]


class UnavailableBackend:
    """A backend the spec may name whose submission is not built yet: it plans like a cloud
    backend and says so when asked to run anything."""

    on_this_machine = False
    poll_s = 10.0

    def __init__(self, name: str) -> None:
        self.name = name

    def _refuse(self) -> BackendError:
        return BackendError(
            f"backend '{self.name}' cannot submit jobs yet; the script is ready in the run folder and runs by hand "
            "(`python train.py`). Use backend: local to run it here, or backend: hf-jobs to rent a GPU."
        )

    def model_reference(self, model_path: str, slot: str = "model") -> str:
        return model_path

    def planned_inputs(self, run_dir: Path, model_path: str, baseline_path: str | None = None) -> InputUpload | None:
        return None

    def preflight(self, flavor: str) -> Account:
        raise self._refuse()

    def find_live(self, request: JobRequest) -> JobHandle | None:
        return None

    def submit(self, request: JobRequest) -> JobHandle:
        raise self._refuse()

    def status(self, handle: JobHandle) -> JobSnapshot:
        raise self._refuse()

    def read_log(self, handle: JobHandle, start: int) -> list[str]:
        raise self._refuse()

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        raise self._refuse()

    def cancel(self, handle: JobHandle) -> None:
        raise self._refuse()

    def fetch(self, handle: JobHandle) -> None:
        raise self._refuse()


_INSTANCES: dict[str, Backend] = {}
_FACTORIES = {"local": LocalBackend, "hf-jobs": HfJobsBackend}


def get_backend(name: str) -> Backend:
    """One instance per name and process (the local backend keeps its child processes)."""
    if name not in _INSTANCES:
        factory = _FACTORIES.get(name)
        _INSTANCES[name] = factory() if factory else UnavailableBackend(name)
    return _INSTANCES[name]


def runs_on_this_machine(name: str) -> bool:
    """Whether planning sizes this machine (local) or a rented flavor (every other backend)."""
    return get_backend(name).on_this_machine
