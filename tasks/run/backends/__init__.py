"""The backend registry: the only place that maps a backend name to its implementation."""

from __future__ import annotations

from tasks.core.spec import PoolSettings
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
_FACTORIES = {"local": LocalBackend, "hf-jobs": HfJobsBackend, "prefect-pool": PrefectPoolBackend}


def get_backend(name: str, pool: PoolSettings | None = None) -> Backend:
    """One instance per name and process (the local backend keeps its child processes). A work
    pool's settings are the run's own, so `pool` gives a fresh instance with them; a job already
    submitted carries what following it needs in its handle."""
    if name == "prefect-pool" and pool is not None:
        return PrefectPoolBackend(pool)
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]
