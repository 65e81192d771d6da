"""The `prefect-pool` backend: the training step as a flow run of a training deployment on a
Prefect work pool, picked up by whichever worker serves the pool (a process worker on a team's
GPU box, a Kubernetes worker that starts a pod on a GPU node).

1. inputs: the worker may not see this disk, so the script, its accelerate config, the
   validated data and a local model folder go to `pool.storage` (an fsspec URL both sides
   reach) under `<run>/attempt-<n>/inputs/`;
2. the job: a flow run of `pool.deployment` (flows/train_job.py) with that storage URL,
   tagged with the run's name, on the deployment's pool (`pool.work_queue` picks a queue), with the
   pool's job variables; the pool's `gpu_count` variable, where its template declares one, is
   set to the plan's processes;
3. following: the child's state from the API, its log (with the progress lines) from the
   storage, mirrored there every few seconds;
4. cancelling: the child is set to Cancelling and its worker stops it (the parent does this
   when it is cancelled itself or its budget guard trips);
5. outputs: `outputs/` of the storage come into the run folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks.core.models import InputUpload, JobHandle, JobSnapshot
from tasks.core.spec import PoolSettings, runs_on_this_machine
from tasks.run.backends.base import (
    SHARED_STORAGE_BYTES_PER_S,
    Account,
    BackendError,
    JobRequest,
    job_inputs,
    load_handle,
    planned_upload,
    save_handle,
    tail_lines,
    uploaded_model_reference,
)
from tasks.run.storage import RunStorage, StorageError, set_aside_other_inputs

STATES = {
    "SCHEDULED": "scheduling",
    "PENDING": "scheduling",
    "RUNNING": "running",
    "PAUSED": "running",
    "CANCELLING": "running",  # still running until its worker has stopped it
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CRASHED": "failed",
    "CANCELLED": "cancelled",
}
ALIVE = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")
CANCEL_WAIT_S = 60.0


class PrefectPoolBackend:
    name = "prefect-pool"
    on_this_machine = runs_on_this_machine(name)
    poll_s = 2.0
    # the worker trains in a temporary folder and copies each checkpoint to <run>/checkpoints on the
    # storage: they outlive a cancelled or failed attempt, and the next one resumes from the newest
    keeps_checkpoints = True

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = settings or PoolSettings()
        self.storage = self.settings.storage or os.environ.get("FINETUNE_POOL_STORAGE")

    # -- where things are -------------------------------------------------------------------
    def _root(self) -> RunStorage:
        if not self.storage:
            raise BackendError(
                "backend: prefect-pool needs pool.storage (or FINETUNE_POOL_STORAGE): an fsspec URL this machine and "
                "the pool's workers both reach (a shared path here, s3://bucket/prefix or gs://... in production)"
            )
        return RunStorage(self.storage)

    def _store(self, run_name: str, attempt: int) -> RunStorage:
        return self._root().child(run_name, f"attempt-{attempt}")

    def _handle_store(self, handle: JobHandle) -> RunStorage:
        return RunStorage(handle.labels["finetune-storage"])

    model_reference = staticmethod(uploaded_model_reference)

    def planned_inputs(self, run_dir: Path, model_path: str, baseline_path: str | None = None) -> InputUpload | None:
        where = f"{self.storage or '<pool.storage>'}/{run_dir.name}/attempt-<n>/inputs"
        return planned_upload(run_dir, model_path, baseline_path, where, SHARED_STORAGE_BYTES_PER_S)

    # -- the API ------------------------------------------------------------------------------
    @contextmanager
    def _api(self) -> Iterator[Any]:
        """Prefect's client for the server the pool's workers use, checked to answer."""
        from prefect import get_client
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:
            raise BackendError(
                "backend: prefect-pool needs the Prefect server that the pool's workers use, and PREFECT_API_URL is not "
                "set (a run without it gets a temporary server no worker sees): start one (`prefect server start`) "
                "and export PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
        with get_client(sync_client=True) as client:
            error = client.api_healthcheck()
            if error is not None:
                raise BackendError(
                    f"backend: prefect-pool needs a Prefect server, and none answers at {client._client.base_url} "
                    f"({error}); start one (`prefect server start`) and set PREFECT_API_URL"
                )
            yield client

    def _deployment(self, client: Any) -> Any:
        from prefect.exceptions import ObjectNotFound

        try:
            return client.read_deployment_by_name(self.settings.deployment)
        except ObjectNotFound:
            raise BackendError(
                f"no training deployment '{self.settings.deployment}' on the Prefect server: create the pool and deploy it "
                "(`prefect work-pool create --type process finetune-train`, then "
                "`prefect --no-prompt deploy --name train`), and start a worker on the pool"
            ) from None

    def preflight(self, flavor: str) -> Account:
        try:
            self._root().check_writable()
        except StorageError as e:
            raise BackendError(str(e)) from None
        with self._api() as client:
            pool = self._deployment(client).work_pool_name
        if not pool:
            raise BackendError(f"deployment '{self.settings.deployment}' has no work pool; deploy it to one")
        return Account(namespace=pool, price_per_hour_usd=None, price_source="the plan (the pool's flavor)")

    def _job_variables(self, client: Any, deployment: Any, processes: int) -> dict[str, Any]:
        """The spec's job variables; and one GPU per process where the pool's template asks how many."""
        variables = dict(self.settings.job_variables)
        template = client.read_work_pool(deployment.work_pool_name).base_job_template or {}
        declared = (template.get("variables") or {}).get("properties") or {}
        if "gpu_count" in declared and "gpu_count" not in variables and processes > 1:
            variables["gpu_count"] = processes
        return variables

    def find_live(self, request: JobRequest) -> JobHandle | None:
        handle = load_handle(Path(request.run_dir))
        if handle is None or handle.backend != self.name or handle.attempt != request.attempt:
            return None
        snapshot = self.status(handle)
        if snapshot.state in ("scheduling", "running"):
            return handle
        same = handle.labels.get("finetune-script") == request.script.sha256
        return handle if snapshot.state == "completed" and same else None

    def submit(self, request: JobRequest) -> JobHandle:
        run_dir = Path(request.run_dir)
        store = self._store(request.run_name, request.attempt)
        checkpoints = self._root().child(request.run_name)
        try:
            set_aside_other_inputs(checkpoints, request.training_key, ("checkpoints",))  # never resumed
            for stale in ("inputs", "outputs", "logs", "exit_status"):  # an earlier start of the same attempt
                if store.fs.exists(store.path(stale)):
                    store.fs.rm(store.path(stale), recursive=True)
            store.put(job_inputs(run_dir, request.model_path, request.baseline_path)[0], "inputs")
        except Exception as e:
            raise BackendError(f"uploading the inputs to {store.url} failed: {type(e).__name__}: {e}") from None
        with self._api() as client:
            deployment = self._deployment(client)
            run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters={
                    "storage": store.url,
                    "run_name": request.run_name,
                    "attempt": request.attempt,
                    "checkpoints": checkpoints.child("checkpoints").url,
                },
                name=f"{request.run_name}-train-{request.attempt}",
                tags=["finetune", f"finetune-run:{request.run_name}"],
                work_queue_name=self.settings.work_queue,
                job_variables=self._job_variables(client, deployment, request.processes) or None,
            )
        log_path = run_dir / "logs" / "train.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = JobHandle(
            backend=self.name,
            job_id=str(run.id),
            run_dir=str(run_dir),
            log_path=str(log_path),
            started_at=datetime.now(UTC),
            flavor=request.flavor,
            timeout_s=request.timeout_s,
            attempt=request.attempt,
            flow_run_id=request.flow_run_id,
            url=f"flow run {run.name} ({run.id}) of {self.settings.deployment}",
            labels={
                "finetune-run": request.run_name,
                "finetune-script": request.script.sha256,
                "finetune-storage": store.url,
            },
        )
        save_handle(handle)
        return handle

    def status(self, handle: JobHandle) -> JobSnapshot:
        with self._api() as client:
            run = client.read_flow_run(UUID(handle.job_id))
        kind = run.state.type.value if run.state is not None else "PENDING"
        state = STATES.get(kind, "failed")
        started = run.start_time or handle.started_at
        ended = run.end_time or datetime.now(UTC)
        billed = (ended - started).total_seconds() if run.start_time else 0.0
        message = None
        if state == "failed":
            message = f"training flow run {run.name} {kind.lower()}: {run.state.message or 'no message'}"
        return JobSnapshot(state=state, billed_s=max(billed, 0.0), message=message)  # type: ignore[arg-type]

    def read_log(self, handle: JobHandle, start: int) -> list[str]:
        text = self._handle_store(handle).read_text("logs/train.log") or ""
        lines = text.split("\n")[:-1][start:]
        Path(handle.log_path).write_text(text, encoding="utf-8")  # the run folder keeps a copy, as for any backend
        return lines

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        text = self._handle_store(handle).read_text("logs/train.log") or ""
        return tail_lines(text.replace("\r", "\n").splitlines(), tail)

    def cancel(self, handle: JobHandle) -> None:
        """Asks the pool's worker to stop the training flow run, and waits until it has."""
        from prefect.states import Cancelling

        with self._api() as client:
            run = client.read_flow_run(UUID(handle.job_id))
            if run.state is None or run.state.type.value not in ALIVE:
                return
            client.set_flow_run_state(UUID(handle.job_id), Cancelling(), force=True)
            deadline = time.time() + CANCEL_WAIT_S
            while time.time() < deadline:
                run = client.read_flow_run(UUID(handle.job_id))
                if run.state is not None and run.state.type.value not in ALIVE:
                    return
                time.sleep(0.5)
        raise BackendError(
            f"the training flow run {handle.job_id} did not stop within {CANCEL_WAIT_S:.0f} s of being cancelled; "
            "is a worker serving its pool?"
        )

    def fetch(self, handle: JobHandle) -> None:
        run_dir = Path(handle.run_dir)
        names = self._handle_store(handle).get_tree("outputs", run_dir)
        if "train_result.json" not in names:
            raise BackendError(
                f"the training flow run left no train_result.json under {handle.labels['finetune-storage']}/outputs"
            )
