"""The `kubernetes` backend: the training as a Kubeflow Trainer TrainJob, on one node or several.

1. the job folder: the script, its accelerate config, the validated data and a local model folder
   go to `kubernetes.storage` (an fsspec URL of the volume the nodes mount) under `<run>/`; the
   folder stays the same for every attempt of the run, so checkpoints outlive a cancelled or
   failed attempt and the next one resumes from them, as a local run does;
2. the job: a TrainJob (tasks/run/backends/trainjob.py) of the plan's nodes and GPUs per node on
   the cluster's torch runtime, named after the run and the attempt (a second start finds the
   first); the token as a Secret reference;
3. following: the TrainJob's conditions and its pods' phases; the first node's log (the script's
   progress lines) through the API;
4. cancelling: the TrainJob is deleted, and with it its pods (the JobSet stops every node when one
   fails, too);
5. outputs: model/, adapter/, trackio/ and train_result.json come from the job folder.

The cluster is the kubeconfig's (KUBECONFIG, `kubernetes.context`) or, inside a pod, its own.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tasks.core.models import InputUpload, JobHandle, JobSnapshot
from tasks.core.spec import KubernetesSettings, runs_on_this_machine
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
from tasks.run.backends.trainjob import GROUP, NODE, PLURAL, VERSION, build_trainjob, trainjob_name
from tasks.run.storage import RunStorage, StorageError, set_aside_other_inputs

OUTPUTS = ("model", "adapter", "trackio", "train_result.json")
KEPT = ("checkpoints", *OUTPUTS)  # what a training made from other inputs leaves, set aside together
DELETE_WAIT_S = 120.0
JOB_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


class KubernetesBackend:
    name = "kubernetes"
    on_this_machine = runs_on_this_machine(name)
    poll_s = 5.0
    keeps_checkpoints = True  # on the shared volume

    def __init__(self, settings: KubernetesSettings | None = None) -> None:
        self.settings = settings or KubernetesSettings()
        self.storage = self.settings.storage or os.environ.get("FINETUNE_K8S_STORAGE")
        self._clients: dict[tuple[str | None, str | None], tuple[Any, Any]] = {}

    # -- where things are -------------------------------------------------------------------
    def _store(self, run_name: str) -> RunStorage:
        if not self.storage:
            raise BackendError(
                "backend: kubernetes needs kubernetes.storage (or FINETUNE_K8S_STORAGE): an fsspec URL of the volume the "
                f"nodes mount as {self.settings.volume_claim} (a shared path here, s3://bucket/prefix or gs://... "
                "behind a CSI driver in production)"
            )
        return RunStorage(self.storage).child(run_name)

    def job_dir(self, run_name: str) -> str:
        """The job folder as the nodes see it."""
        return f"{self.settings.mount_path.rstrip('/')}/{run_name}"

    model_reference = staticmethod(uploaded_model_reference)

    def planned_inputs(self, run_dir: Path, model_path: str, baseline_path: str | None = None) -> InputUpload | None:
        where = f"{self.storage or '<kubernetes.storage>'}/{run_dir.name}"
        return planned_upload(run_dir, model_path, baseline_path, where, SHARED_STORAGE_BYTES_PER_S)

    # -- the API ------------------------------------------------------------------------------
    def _apis(self, context: str | None = None) -> tuple[Any, Any]:
        """The cluster's custom objects (TrainJobs) and core (pods, logs) APIs, connected once per
        kubeconfig and context rather than on every poll."""
        context = context or self.settings.context
        key = (os.environ.get("KUBECONFIG"), context)
        if key not in self._clients:
            self._clients[key] = self._connect(context)
        return self._clients[key]

    def _connect(self, context: str | None) -> tuple[Any, Any]:
        try:
            from kubernetes import client, config
        except ImportError:
            raise BackendError("backend: kubernetes needs the kubeflow SDK: pip install '.[kubernetes]'") from None
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG") and not context:
                config.load_incluster_config()
                api = client.ApiClient()
            else:
                where = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
                api = config.new_client_from_config(config_file=where, context=context)
        except (config.ConfigException, OSError) as e:
            raise BackendError(
                f"backend: kubernetes finds no cluster ({e}): set KUBECONFIG (and kubernetes.context), or run inside one"
            ) from None
        return client.CustomObjectsApi(api), client.CoreV1Api(api)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One API call, its failure said as what to fix (a missing object is the caller's to read: 404 passes)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                raise
            if e.status in (401, 403):
                raise BackendError(
                    f"the cluster refused to {what} ({e.status} {e.reason}): the account needs, in namespace "
                    f"{self.settings.namespace}, trainjobs create/get/delete, pods list and pods/log get, and "
                    "clustertrainingruntimes get"
                ) from None
            raise BackendError(f"the cluster could not {what}: {e.status} {e.reason}: {(e.body or '')[:300]}") from None
        except HTTPError as e:
            raise BackendError(f"the cluster does not answer ({what}): {type(e).__name__}: {e}") from None

    def _get_job(self, custom: Any, name: str, namespace: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call(
                f"read TrainJob {name}", custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException:  # 404
            return None

    def preflight(self, flavor: str) -> Account:
        from kubernetes.client.exceptions import ApiException

        try:
            self._store("").check_writable()
        except StorageError as e:
            raise BackendError(str(e)) from None
        custom, _ = self._apis()
        runtime = self.settings.runtime
        try:
            self._call(
                f"read the training runtime {runtime}",
                custom.get_cluster_custom_object,
                GROUP,
                VERSION,
                "clustertrainingruntimes",
                runtime,
            )
        except ApiException:
            raise BackendError(
                f"the cluster has no ClusterTrainingRuntime '{runtime}': install Kubeflow Trainer's control plane and "
                "its runtimes (deployments/k8s/README.md), or set kubernetes.runtime"
            ) from None
        return Account(
            namespace=self.settings.namespace, price_per_hour_usd=None, price_source="the plan (the cluster's flavor)"
        )

    # -- one job ------------------------------------------------------------------------------
    def find_live(self, request: JobRequest) -> JobHandle | None:
        name = trainjob_name(request.run_name, request.attempt)
        custom, _ = self._apis()
        job = self._get_job(custom, name, self.settings.namespace)
        if job is None:
            return None
        state = _state(job)[0]
        handle = load_handle(Path(request.run_dir))
        mine = handle is not None and handle.backend == self.name and handle.job_id == name
        if state in ("scheduling", "running"):
            return handle if mine else self._handle(request, name, job)
        same = mine and handle.labels.get("finetune-script") == request.script.sha256  # type: ignore[union-attr]
        return handle if state == "completed" and same else None

    def submit(self, request: JobRequest) -> JobHandle:
        store = self._store(request.run_name)
        try:
            set_aside_other_inputs(store, request.training_key, KEPT)
            for stale in ("train_result.json",):
                if store.fs.exists(store.path(stale)):
                    store.fs.rm(store.path(stale))
            store.put(job_inputs(Path(request.run_dir), request.model_path, request.baseline_path)[0], "")
        except Exception as e:
            raise BackendError(f"uploading the job folder to {store.url} failed: {type(e).__name__}: {e}") from None
        name = trainjob_name(request.run_name, request.attempt)
        custom, _ = self._apis()
        self._remove_finished(custom, name)
        manifest = self.manifest(request, name)
        Path(request.run_dir, "trainjob.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        self._call(
            f"create TrainJob {name}",
            custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.settings.namespace,
            PLURAL,
            manifest,
        )
        handle = self._handle(request, name, None)
        save_handle(handle)
        return handle

    def manifest(self, request: JobRequest, name: str) -> dict[str, Any]:
        nodes = max(1, request.nodes)
        return build_trainjob(
            self.settings,
            name,
            self.job_dir(request.run_name),
            nodes,
            request.gpus_per_node,
            {"finetune-run": name.removesuffix(f"-a{request.attempt}")[:63]},
            JOB_ENV,
        )

    def _handle(self, request: JobRequest, name: str, job: dict[str, Any] | None) -> JobHandle:
        log_path = Path(request.run_dir) / "logs" / "train.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        created = (job or {}).get("metadata", {}).get("creationTimestamp")
        return JobHandle(
            backend=self.name,
            job_id=name,
            run_dir=request.run_dir,
            log_path=str(log_path),
            started_at=datetime.fromisoformat(created.replace("Z", "+00:00")) if created else datetime.now(UTC),
            namespace=self.settings.namespace,
            flavor=request.flavor,
            timeout_s=request.timeout_s,
            attempt=request.attempt,
            flow_run_id=request.flow_run_id,
            url=f"TrainJob {self.settings.namespace}/{name} ({max(1, request.nodes)} node(s))",
            labels={
                "finetune-run": request.run_name,
                "finetune-script": request.script.sha256,
                "finetune-storage": self._store(request.run_name).url,
                "finetune-context": self.settings.context or "",
            },
        )

    def _remove_finished(self, custom: Any, name: str) -> None:
        """A finished TrainJob of the same name (an earlier start of this attempt that failed or was
        cancelled) goes, so the new one can take its name; its checkpoints stay on the volume."""
        job = self._get_job(custom, name, self.settings.namespace)
        if job is None:
            return
        if _state(job)[0] in ("scheduling", "running"):
            raise BackendError(f"TrainJob {name} is still running; follow it, or cancel it first")
        self._delete(custom, name, self.settings.namespace)

    def _delete(self, custom: Any, name: str, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._call(
                f"delete TrainJob {name}",
                custom.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                propagation_policy="Foreground",  # its pods go before it does
            )
        except ApiException:  # already gone
            return
        deadline = time.time() + DELETE_WAIT_S
        while time.time() < deadline:
            if self._get_job(custom, name, namespace) is None:
                return
            time.sleep(0.5)
        raise BackendError(f"TrainJob {namespace}/{name} was deleted but is still there after {DELETE_WAIT_S:.0f} s")

    def status(self, handle: JobHandle) -> JobSnapshot:
        custom, core = self._apis(handle.labels.get("finetune-context") or None)
        job = self._get_job(custom, handle.job_id, handle.namespace or self.settings.namespace)
        store = RunStorage(handle.labels["finetune-storage"])
        if job is None:
            done = store.read_text("train_result.json") is not None
            state, message = (
                ("completed", None) if done else ("cancelled", f"TrainJob {handle.job_id} is gone (deleted)")
            )
            return JobSnapshot(state=state, billed_s=0.0, message=message)  # type: ignore[arg-type]
        state, message, ended = _state(job)
        if state == "scheduling" and any(p.status.phase == "Running" for p in self._pods(core, handle)):
            state = "running"
        end = ended or datetime.now(UTC)
        billed = max((end - handle.started_at).total_seconds(), 0.0)  # every node is held from creation
        if state == "failed":
            message = f"TrainJob {handle.job_id} failed: {message}"
        return JobSnapshot(state=state, billed_s=billed, message=message)  # type: ignore[arg-type]

    def _pods(self, core: Any, handle: JobHandle) -> list[Any]:
        selector = f"jobset.sigs.k8s.io/jobset-name={handle.job_id},jobset.sigs.k8s.io/replicatedjob-name={NODE}"
        namespace = handle.namespace or self.settings.namespace
        pods = self._call("list the TrainJob's pods", core.list_namespaced_pod, namespace, label_selector=selector)
        return sorted(pods.items, key=_node_index)

    def _node_log(self, handle: JobHandle, index: int = 0) -> str:
        from kubernetes.client.exceptions import ApiException

        _, core = self._apis(handle.labels.get("finetune-context") or None)
        pods = [p for p in self._pods(core, handle) if _node_index(p) == index]
        if not pods:
            return ""
        try:
            return self._call(
                "read a node's log",
                core.read_namespaced_pod_log,
                pods[-1].metadata.name,
                handle.namespace or self.settings.namespace,
                container=NODE,
            )
        except ApiException:
            return ""

    def read_log(self, handle: JobHandle, start: int) -> list[str]:
        """The first node's log: the main process prints the progress lines."""
        text = self._node_log(handle)
        if text:
            Path(handle.log_path).write_text(text, encoding="utf-8")  # the run folder keeps a copy, as for any backend
        return text.split("\n")[:-1][start:]

    def logs(self, handle: JobHandle, tail: int = 50) -> str:
        """The first node's last lines, and those of any node that failed (the cause is often there)."""
        _, core = self._apis(handle.labels.get("finetune-context") or None)
        parts = [tail_lines(self._node_log(handle).replace("\r", "\n").splitlines(), tail)]
        for pod in self._pods(core, handle):
            if _node_index(pod) != 0 and pod.status.phase == "Failed":
                text = self._node_log(handle, _node_index(pod))
                parts.append(f"--- node {_node_index(pod)} ---\n" + tail_lines(text.splitlines(), tail // 2))
        return "\n".join(p for p in parts if p)

    def cancel(self, handle: JobHandle) -> None:
        custom, _ = self._apis(handle.labels.get("finetune-context") or None)
        self._delete(custom, handle.job_id, handle.namespace or self.settings.namespace)

    def fetch(self, handle: JobHandle) -> None:
        store, run_dir = RunStorage(handle.labels["finetune-storage"]), Path(handle.run_dir)
        for name in OUTPUTS:
            if store.fs.isdir(store.path(name)):
                store.get_tree(name, run_dir / name)
            elif name == "train_result.json":
                text = store.read_text(name)
                if text is None:
                    raise BackendError(f"the TrainJob left no train_result.json in {store.url}")
                (run_dir / name).write_text(text)


def _node_index(pod: Any) -> int:
    annotations = pod.metadata.annotations or {}
    return int(annotations.get("batch.kubernetes.io/job-completion-index", 0))


def _state(job: dict[str, Any]) -> tuple[str, str | None, datetime | None]:
    """A TrainJob's stage from its conditions (status "True"): Complete, Failed; else it has yet to
    finish (scheduling until a pod runs). A Suspended condition is read as it is, not as forever
    Created (the SDK's reading)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        when = condition.get("lastTransitionTime")
        ended = datetime.fromisoformat(when.replace("Z", "+00:00")) if when else None
        if condition.get("type") == "Complete":
            return "completed", None, ended
        if condition.get("type") == "Failed":
            return "failed", condition.get("message") or condition.get("reason") or "no message", ended
    return "scheduling", None, None
