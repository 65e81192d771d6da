"""The backend registry: the only place that maps a backend name to its implementation."""

from __future__ import annotations

from tasks.core.spec import BackendSettings
from tasks.run.backends.base import (
    Account,
    Backend,
    BackendError,
    JobRequest,
    load_handle,
    save_handle,
)
from tasks.run.backends.hf_jobs import HfJobsBackend
from tasks.run.backends.kubernetes import KubernetesBackend
from tasks.run.backends.local import LocalBackend
from tasks.run.backends.prefect_pool import PrefectPoolBackend

__all__ = [
    "Account",
    "Backend",
    "BackendError",
    "JobRequest",
    "get_backend",
    "load_handle",
    "save_handle",
]


_INSTANCES: dict[str, Backend] = {}
_FACTORIES = {
    "local": LocalBackend,
    "hf-jobs": HfJobsBackend,
    "prefect-pool": PrefectPoolBackend,
    "kubernetes": KubernetesBackend,
}
_CONFIGURED = {"prefect-pool": PrefectPoolBackend, "kubernetes": KubernetesBackend}


def get_backend(name: str, settings: BackendSettings | None = None) -> Backend:
    """One instance per name and process (the local backend keeps its child processes). A work
    pool's or a cluster's settings are the run's own, so `settings` gives a fresh instance with
    them; a job already submitted carries what following it needs in its handle."""
    if name in _CONFIGURED and settings is not None:
        return _CONFIGURED[name](settings)  # type: ignore[arg-type]
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]
