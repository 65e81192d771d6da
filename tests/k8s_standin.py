"""A stand-in for the Kubernetes API with Kubeflow Trainer installed, that really runs each
TrainJob's nodes, as local processes.

The routes are the ones the kubernetes client calls for the `kubernetes` backend: read a
ClusterTrainingRuntime; create, read and delete a TrainJob; list a TrainJob's pods by their
JobSet labels; read a pod's log. A created TrainJob is read with the Trainer's own API types
(as the API server checks it against its schema) and gets `numNodes` "pods": processes that run
the trainer's command with only the container's environment (its values, and its Secret
references resolved from `secrets`), PATH, and what Trainer's torch runtime sets on each node:
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR (127.0.0.1 here: the first
node's pod) and PET_MASTER_PORT. The volume is emulated: the mount path in the command is the
claim's folder in `claims`. The image is emulated too: `uv run` is a shim that runs this
interpreter, whose environment holds the script's pinned dependencies.

As a JobSet does, a node that fails fails the TrainJob and the other nodes are stopped; deleting
the TrainJob stops its nodes (SIGTERM, then SIGKILL after `grace_s`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.jobs_standin import UV_SHIM

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
RUNTIME = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/clustertrainingruntimes/([^/]+)$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Node:
    rank: int
    pod: str
    proc: subprocess.Popen
    log: Path
    started: str = field(default_factory=_now)

    @property
    def phase(self) -> str:
        code = self.proc.poll()
        return "Running" if code is None else "Succeeded" if code == 0 else "Failed"


@dataclass
class Job:
    manifest: dict[str, Any]
    nodes: list[Node]
    created: str = field(default_factory=_now)
    failed: str | None = None  # why, once a node failed
    ended: str | None = None

    def conditions(self) -> list[dict[str, str]]:
        if self.failed:
            return [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "NodeFailed",
                    "message": self.failed,
                    "lastTransitionTime": self.ended or _now(),
                }
            ]
        if self.nodes and all(n.phase == "Succeeded" for n in self.nodes):
            return [
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "JobsCompleted",
                    "message": "jobset completed successfully",
                    "lastTransitionTime": self.ended or _now(),
                }
            ]
        return []  # fmt: skip


class KubernetesStandin:
    """`with KubernetesStandin(claims={"finetune-runs": folder}) as k8s:`; `k8s.kubeconfig` is a
    kubeconfig file naming it (the backend's real code path: KUBECONFIG)."""

    def __init__(
        self,
        claims: dict[str, Path],
        secrets: dict[str, dict[str, str]] | None = None,
        runtimes: tuple[str, ...] = ("torch-distributed",),
        grace_s: float = 10.0,
    ) -> None:
        self.claims, self.secrets, self.runtimes, self.grace_s = claims, secrets or {}, runtimes, grace_s
        self.jobs: dict[tuple[str, str], Job] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []  # every manifest the API accepted, as sent
        self.lock = threading.Lock()
        self.home = Path(tempfile.mkdtemp(prefix="k8s-standin-"))
        (self.home / "bin").mkdir()
        shim = self.home / "bin" / "uv"
        shim.write_text(UV_SHIM)
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)

    # -- the server ---------------------------------------------------------------------------
    def __enter__(self) -> KubernetesStandin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: Any, text: bool = False) -> None:
                data = body.encode() if text else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                standin.requests.append((method, url.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, answer, text = standin.route(method, url.path, parse_qs(url.query), body)
                self._answer(code, answer, text)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.kubeconfig = self.home / "kubeconfig"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "standin", "user": {}}],
                    "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
                    "current-context": "standin",
                }
            )
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        for job in list(self.jobs.values()):
            self._stop(job)
        self.server.shutdown()

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any], bool]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code}, False  # fmt: skip

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any, bool]:
        if m := RUNTIME.match(path):
            if m.group(1) not in self.runtimes:
                return self._status(404, "NotFound", f'clustertrainingruntimes "{m.group(1)}" not found')
            return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime", "metadata": {"name": m.group(1), "labels": {"trainer.kubeflow.org/framework": "torch"}}}, False  # fmt: skip
        if m := TRAINJOBS.match(path):
            namespace, name = m.groups()
            if method == "POST" and name is None:
                return self._create(namespace, body)
            job = self.jobs.get((namespace, name or ""))
            if job is None:
                return self._status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            if method == "DELETE":
                self._stop(job)
                with self.lock:
                    self.jobs.pop((namespace, name or ""), None)
                return 200, {"kind": "Status", "status": "Success"}, False
            return 200, self._object(job), False
        if m := PODS.match(path):
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self._pods(m.group(1), query)}, False  # fmt: skip
        if m := POD_LOG.match(path):
            node = self._node(m.group(1), m.group(2))
            if node is None:
                return self._status(404, "NotFound", f'pods "{m.group(2)}" not found')
            return 200, node.log.read_text(errors="replace") if node.log.exists() else "", True
        return self._status(404, "NotFound", f"the stand-in has no route {method} {path}")

    # -- TrainJobs ------------------------------------------------------------------------------
    def _create(self, namespace: str, manifest: dict[str, Any]) -> tuple[int, Any, bool]:
        from kubeflow_trainer_api import models as m

        try:
            m.TrainerV1alpha1TrainJob.from_dict(manifest)
        except Exception as e:  # what the API server's schema check answers
            return self._status(422, "Invalid", f"TrainJob is invalid: {e}")
        name = manifest["metadata"]["name"]
        if (namespace, name) in self.jobs:
            return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
        runtime = manifest["spec"]["runtimeRef"]["name"]
        if runtime not in self.runtimes:
            return self._status(422, "Invalid", f'ClusterTrainingRuntime "{runtime}" not found')
        self.created.append(json.loads(json.dumps(manifest)))
        job = Job(manifest=manifest, nodes=[])
        with self.lock:
            self.jobs[(namespace, name)] = job
        job.nodes = self._start_nodes(namespace, name, manifest)
        threading.Thread(target=self._watch, args=(job,), daemon=True).start()
        return 201, self._object(job), False

    def _start_nodes(self, namespace: str, name: str, manifest: dict[str, Any]) -> list[Node]:
        trainer = manifest["spec"]["trainer"]
        count = int(trainer.get("numNodes") or 1)
        port = _free_port()
        mounts = _mounts(manifest, self.claims)
        nodes = []
        for rank in range(count):
            pod = f"{name}-node-0-{rank}-{os.urandom(3).hex()[:5]}"
            env = {"PATH": f"{self.home / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin", "HOME": str(self.home), "STANDIN_POD": pod}  # fmt: skip
            for var in trainer.get("env") or []:
                env[var["name"]] = self._value(namespace, var)
            env |= {"PET_NNODES": str(count), "PET_NPROC_PER_NODE": str(os.cpu_count() or 1), "PET_NODE_RANK": str(rank),
                    "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
            for key in ("FINETUNE_TEST_MARK", "OMP_NUM_THREADS", "PYTHONPATH"):  # the test's, as the image's would be
                if key in os.environ:
                    env.setdefault(key, os.environ[key])
            command = [_mounted(part, mounts) for part in trainer["command"]]
            log = self.home / f"{pod}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            nodes.append(Node(rank, pod, proc, log))
        return nodes

    def _value(self, namespace: str, var: dict[str, Any]) -> str:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            return str(var.get("value", ""))
        return self.secrets.get(ref["name"], {}).get(ref["key"], "")

    def _watch(self, job: Job) -> None:
        """A JobSet's failure policy: the first node that fails fails the job; the rest are stopped."""
        while any(n.proc.poll() is None for n in job.nodes):
            failed = [n for n in job.nodes if n.phase == "Failed"]
            if failed and job.failed is None:
                job.failed = f"node {failed[0].rank} ({failed[0].pod}) exited with code {failed[0].proc.returncode}"
                job.ended = _now()
                self._stop(job)
                return
            time.sleep(0.2)
        failed = [n for n in job.nodes if n.phase == "Failed"]
        if failed and job.failed is None:
            job.failed = f"node {failed[0].rank} ({failed[0].pod}) exited with code {failed[0].proc.returncode}"
        job.ended = job.ended or _now()

    def _stop(self, job: Job) -> None:
        """A pod's end stops everything in its container: the node's process and every process
        started below it, also those whose parent is already gone (found by the pod's name in
        their environment, as a container's cgroup holds them)."""
        from tasks.run.backends.local import kill_all, pid_alive
        from tests.processes import marked_processes

        every = [p for n in job.nodes for p in marked_processes(n.pod, "STANDIN_POD")]
        kill_all(every, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while any(pid_alive(p) for p in every) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_all([p for p in every if pid_alive(p)], signal.SIGKILL)
        for node in job.nodes:
            node.proc.wait()

    def _object(self, job: Job) -> dict[str, Any]:
        meta = {**job.manifest["metadata"], "creationTimestamp": job.created, "uid": job.manifest["metadata"]["name"]}
        return {**job.manifest, "metadata": meta, "status": {"conditions": job.conditions()}}

    def _pods(self, namespace: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        wanted = dict(part.split("=", 1) for part in (query.get("labelSelector") or [""])[0].split(",") if "=" in part)
        name = wanted.get("jobset.sigs.k8s.io/jobset-name")
        job = self.jobs.get((namespace, name or ""))
        if job is None:
            return []
        return [
            {
                "metadata": {
                    "name": n.pod,
                    "namespace": namespace,
                    "labels": {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node"},
                    "annotations": {"batch.kubernetes.io/job-completion-index": str(n.rank)},
                },
                "status": {"phase": n.phase, "startTime": n.started},
            }
            for n in job.nodes
        ]

    def _node(self, namespace: str, pod: str) -> Node | None:
        for (ns, _), job in list(self.jobs.items()):
            for node in job.nodes:
                if ns == namespace and node.pod == pod:
                    return node
        return None

    def node_pids(self, name: str, namespace: str = "default") -> list[int]:
        job = self.jobs.get((namespace, name))
        return [n.proc.pid for n in job.nodes] if job else []


def _mounts(manifest: dict[str, Any], claims: dict[str, Path]) -> dict[str, Path]:
    """Mount path -> local folder, from the node pods' volume patch and the stand-in's claims."""
    found: dict[str, Path] = {}
    for patch in manifest["spec"].get("runtimePatches") or []:
        jobs = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for job in jobs:
            pod = job.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
            for container in pod.get("containers", []):
                for mount in container.get("volumeMounts", []):
                    claim = volumes.get(mount["name"])
                    if claim in claims:
                        found[mount["mountPath"]] = claims[claim]
    return found


def _mounted(part: str, mounts: dict[str, Path]) -> str:
    for path, folder in mounts.items():
        part = part.replace(path, str(folder))
    return part


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
