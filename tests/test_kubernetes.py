"""Training past one machine: `backend: kubernetes` as a Kubeflow Trainer TrainJob, checked against
the Trainer's own API types, run on tests/k8s_standin.py (the Kubernetes API, whose TrainJobs
really run: each node a local process with the variables the torch runtime sets, launching
exactly as a node of a cluster does), and the planner weighing nodes and CPU offload."""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows.sft import sft
from tasks.core.spec import KubernetesSettings, load_spec
from tasks.run.backends.kubernetes import JOB_ENV, KubernetesBackend
from tasks.run.backends.trainjob import ManifestError, build_trainjob, check_trainjob, trainjob_name
from tasks.run.storage import complete_checkpoints
from tests.helpers import EXAMPLES, REPO
from tests.processes import wait_until_gone

STEPS, SAVE, LOG = 24, 8, 4
SECRET = "hf_standin_secret_value_0123456789"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tests.k8s_standin import KubernetesStandin

    volume = tmp_path / "volume"
    volume.mkdir()
    with KubernetesStandin(claims={"finetune-runs": volume}, secrets={"hf-token": {"token": SECRET}}) as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig))
        monkeypatch.setenv("FINETUNE_K8S_STORAGE", str(volume))
        k8s.volume = volume  # type: ignore[attr-defined]
        yield k8s


def _spec(name: str, **over: object) -> object:
    return load_spec(EXAMPLES / "sft-tiny-kubernetes.yaml", {"name": name, **over})


def test_a_trainjob_is_built_from_the_trainers_api_types_with_the_token_by_reference():
    settings = KubernetesSettings(namespace="team-a", volume_claim="runs-rwx")
    name = trainjob_name("Llama 70B full/run", 2)
    manifest = build_trainjob(settings, name, "/workspace/run", 2, 8, {"finetune-run": "x"}, {"PYTHONUNBUFFERED": "1"})
    check_trainjob(manifest)  # reads back unchanged through kubeflow_trainer_api's TrainerV1alpha1TrainJob
    assert name.endswith("-a2") and len(name) <= 63
    trainer = manifest["spec"]["trainer"]
    assert manifest["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    token = next(e for e in trainer["env"] if e["name"] == "HF_TOKEN")
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"key": "token", "name": "hf-token", "optional": True}},
    }
    assert trainer["command"][-1] == 'cd "/workspace/run" && exec uv run train.py'
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = pod["template"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "runs-rwx"}} in volumes

    for breaks, says in [
        (lambda d: d["spec"]["trainer"].update(numNode=2), "spec.trainer.numNode"),
        (lambda d: d["spec"]["trainer"].update(numNodes="2"), "valid integer"),
        (lambda d: d["spec"]["trainer"]["env"].append({"value": "x"}), r"env\[2\]\.name"),
        (lambda d: d["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"}), "PET_NNODES"),
        (lambda d: d["metadata"].update(name="Not_A_Label"), "not a DNS label"),
        (lambda d: d["spec"]["trainer"].update(numNodes=0), "at least 1"),
    ]:
        broken = copy.deepcopy(manifest)
        breaks(broken)
        with pytest.raises(ManifestError, match=says):
            check_trainjob(broken)


def test_the_manifest_to_apply_by_hand_is_the_one_the_backend_builds():
    """deployments/k8s/trainjob.yaml, for `kubectl apply -f`, is what a 2-node run of 8 GPUs submits."""
    shipped = yaml.safe_load((REPO / "deployments" / "k8s" / "trainjob.yaml").read_text())
    check_trainjob(shipped)
    name, labels = trainjob_name("my-run", 1), {"finetune-run": "ft-my-run"}
    assert shipped == build_trainjob(KubernetesSettings(), name, "/workspace/my-run", 2, 8, labels, JOB_ENV)


def test_preflight_says_what_the_cluster_lacks(cluster, monkeypatch):
    backend = KubernetesBackend(KubernetesSettings(runtime="torch-missing"))
    with pytest.raises(Exception, match="no ClusterTrainingRuntime 'torch-missing'.*Trainer's control plane"):
        backend.preflight("cpu-node")
    assert KubernetesBackend().preflight("cpu-node").namespace == "default"
    monkeypatch.delenv("FINETUNE_K8S_STORAGE")
    with pytest.raises(Exception, match="kubernetes.storage"):
        KubernetesBackend().preflight("cpu-node")
    monkeypatch.setenv("FINETUNE_K8S_STORAGE", str(cluster.volume))
    monkeypatch.setenv("KUBECONFIG", str(cluster.volume / "no-such-kubeconfig"))
    with pytest.raises(Exception, match="finds no cluster"):
        KubernetesBackend().preflight("cpu-node")


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_two_nodes_train_through_a_trainjob_and_a_killed_node_is_resumed_by_the_next_run(
    trains, prefect_server, cluster, tmp_path, monkeypatch
):
    """Each node is a process running the pod's command with the runtime's PET_* variables, as a
    node of the cluster does; they rendezvous on 127.0.0.1 and train over gloo. Node 1 is killed
    after the first checkpoint: the TrainJob fails, node 0 is stopped, and nothing is left; the
    next run of the same spec resumes from the checkpoint on the volume and finishes."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("FINETUNE_TEST_MARK", mark)
    monkeypatch.setenv("FINETUNE_POLL_S", "0.5")
    spec = _spec("two-nodes", training={"max_steps": STEPS, "save_steps": SAVE, "logging_steps": LOG})
    job_dir = cluster.volume / "two-nodes"
    killed: list[int] = []

    def kill_node_1_after_a_checkpoint() -> None:
        name = trainjob_name("two-nodes", 1)
        deadline = time.monotonic() + 300
        while f"checkpoint-{SAVE}" not in [c.name for c in complete_checkpoints(job_dir / "checkpoints")]:
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        pid = cluster.node_pids(name)[1]
        import os

        os.kill(pid, signal.SIGKILL)  # the node's launcher, as a lost machine would
        killed.append(pid)

    threading.Thread(target=kill_node_1_after_a_checkpoint, daemon=True).start()
    with pytest.raises(Exception, match="node 1"):
        sft(spec=spec)
    assert killed, "node 1 was never killed"
    assert not wait_until_gone(mark, keep=set()), "a node's processes outlived the failed TrainJob"
    (manifest,) = cluster.created
    assert manifest["spec"]["trainer"]["numNodes"] == 2 and SECRET not in json.dumps(manifest)

    summary = sft(spec=spec)
    job = summary.job  # type: ignore[attr-defined]
    assert summary.error is None and job.state == "completed" and job.steps == STEPS  # type: ignore[attr-defined]
    run_dir = Path(summary.run_dir)  # type: ignore[attr-defined]
    log = (run_dir / "logs" / "train.log").read_text()
    assert f"resuming from {job_dir}/checkpoints/checkpoint-" in log
    assert "process 0 of 2 trained" in log
    # node 1's log of each TrainJob (both named after the run's attempt 1), the re-run's last
    node_1 = sorted(
        cluster.home.glob(f"{trainjob_name('two-nodes', 1)}-node-0-1-*.log"), key=lambda p: p.stat().st_mtime
    )
    assert len(node_1) == 2 and "process 1 of 2 trained" in node_1[-1].read_text()
    assert (run_dir / "model").is_dir() and (run_dir / "train_result.json").exists()
    assert not wait_until_gone(mark, keep=set()), "processes outlived the finished TrainJob"
    for path in [*run_dir.rglob("*"), *cluster.home.glob("*.log")]:
        if path.is_file() and path.suffix in (".json", ".yaml", ".log", ".md", ".py"):
            assert SECRET not in path.read_text(errors="replace"), path
