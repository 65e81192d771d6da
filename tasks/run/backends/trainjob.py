"""The Kubeflow Trainer TrainJob of a run: built from the Trainer's own API types
(`kubeflow_trainer_api`, installed with the `kubeflow` SDK) and checked against them.

One TrainJob per attempt: `num_nodes` pods of the cluster's torch runtime, each asking for the
plan's GPUs per node and running the generated script from the run's job folder on a shared
volume. The runtime sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT on each
node; the script reads them to launch its processes across the nodes (`accelerate launch`, which
starts them through torch.distributed.run, torchrun's engine). The Hugging Face token reaches
the nodes as a reference to a Secret, never as a value in the manifest.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from tasks.core.errors import UserFacingError
from tasks.core.spec import KubernetesSettings

API_VERSION = "trainer.kubeflow.org/v1alpha1"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
MANAGER = "finetune-flow.dev/engine"  # runtimePatches name who patched (a domain-prefixed path)
NODE = "node"  # the torch runtime's replicated job and container
VOLUME = "runs"
MAX_NAME = 63  # a DNS label: the TrainJob's name becomes its pods' host names


class ManifestError(UserFacingError, ValueError):
    """A TrainJob manifest the Trainer's API types reject; the message says which field."""


def trainjob_name(run_name: str, attempt: int) -> str:
    """A DNS label naming the run and the attempt, the same for every start of that attempt (so a
    second start finds the first), with a hash when the run's name had to be shortened."""
    base = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run"
    suffix = f"-a{attempt}"
    name = f"ft-{base}{suffix}"
    if len(name) > MAX_NAME or base != run_name:
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:6]
        name = f"ft-{base[: MAX_NAME - len(suffix) - 10].rstrip('-')}-{digest}{suffix}"
    return name


def node_command(settings: KubernetesSettings, job_dir: str) -> list[str]:
    """What each node runs: the script from the job folder, as every backend runs it."""
    run = "uv run train.py" if settings.run_with == "uv" else "python train.py"
    return ["bash", "-c", f'cd "{job_dir}" && exec {run}']


def build_trainjob(
    settings: KubernetesSettings,
    name: str,
    job_dir: str,
    nodes: int,
    gpus_per_node: int,
    labels: dict[str, str],
    env: dict[str, str],
) -> dict[str, Any]:
    """The manifest, as `kubectl apply` and the API take it (camelCase, no empty fields)."""
    from kubeflow_trainer_api import models as m

    variables = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in sorted(env.items())]
    if settings.token_secret:
        secret = m.IoK8sApiCoreV1SecretKeySelector(name=settings.token_secret, key="token", optional=True)
        variables.append(
            m.IoK8sApiCoreV1EnvVar(name="HF_TOKEN", valueFrom=m.IoK8sApiCoreV1EnvVarSource(secretKeyRef=secret))
        )
    quantity = m.IoK8sApimachineryPkgApiResourceQuantity(str(gpus_per_node))  # a string: an int serialises as 8.0
    resources = {settings.gpu_resource: quantity} if gpus_per_node else {}
    trainer = m.TrainerV1alpha1Trainer(
        image=settings.image,
        command=node_command(settings, job_dir),
        numNodes=nodes,
        env=variables,
        resourcesPerNode=m.IoK8sApiCoreV1ResourceRequirements(limits=resources, requests=resources)
        if resources
        else None,
    )
    job = m.TrainerV1alpha1TrainJob(
        apiVersion=API_VERSION,
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=settings.namespace, labels=labels),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtimeRef=m.TrainerV1alpha1RuntimeRef(
                name=settings.runtime, kind="ClusterTrainingRuntime", apiGroup=GROUP
            ),
            trainer=trainer,
            runtimePatches=[_volume_patch(m, settings)],
        ),
    )
    manifest = job.to_dict()
    check_trainjob(manifest)
    return manifest


def _volume_patch(m: Any, settings: KubernetesSettings) -> Any:
    """The shared volume on every node: Trainer 2.3 takes volumes as a runtime patch of the node pods."""
    claim = m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claimName=settings.volume_claim)
    shm = m.IoK8sApiCoreV1EmptyDirVolumeSource(medium="Memory")  # NCCL's shared memory: a container's is 64 MB
    mounts = [
        m.IoK8sApiCoreV1VolumeMount(name=VOLUME, mountPath=settings.mount_path),
        m.IoK8sApiCoreV1VolumeMount(name="shm", mountPath="/dev/shm"),
    ]
    pod = m.TrainerV1alpha1PodSpecPatch(
        volumes=[
            m.IoK8sApiCoreV1Volume(name=VOLUME, persistentVolumeClaim=claim),
            m.IoK8sApiCoreV1Volume(name="shm", emptyDir=shm),
        ],
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE, volumeMounts=mounts)],
    )
    node_job = m.TrainerV1alpha1ReplicatedJobPatch(
        name=NODE,
        template=m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))
        ),
    )
    return m.TrainerV1alpha1RuntimePatch(
        manager=MANAGER,
        trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(replicatedJobs=[node_job])
            )
        ),
    )


# the torch runtime sets these on every node; the Trainer's webhook refuses a TrainJob that sets them
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def check_trainjob(manifest: dict[str, Any]) -> None:
    """A manifest as the Trainer's API types read it. Those types drop fields they do not know and
    fill missing names with '' rather than refuse, so the manifest must also read back unchanged:
    a misspelled field (`numNode`) or an env var without a name is an error here, not a surprise
    in the cluster. Also what the Trainer's webhook refuses: a name that is not a DNS label, no
    node, the runtime's own environment variables."""
    from kubeflow_trainer_api import models as m
    from pydantic import ValidationError

    try:
        parsed = m.TrainerV1alpha1TrainJob.from_dict(manifest)
    except (ValidationError, ValueError, TypeError) as e:
        raise ManifestError(f"the TrainJob does not match the Trainer's API types: {e}") from None
    if parsed is None or parsed.to_dict() != manifest:
        raise ManifestError(
            "the TrainJob has fields the Trainer's API types do not know or leaves required ones empty: "
            f"{_difference(manifest, parsed.to_dict() if parsed else {})}"
        )
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME:
        raise ManifestError(f"metadata.name '{name}' is not a DNS label (a-z, 0-9, '-', at most {MAX_NAME})")
    trainer = manifest.get("spec", {}).get("trainer") or {}
    if int(trainer.get("numNodes") or 0) < 1:
        raise ManifestError("spec.trainer.numNodes must be at least 1")
    reserved = sorted({e.get("name") for e in trainer.get("env") or []} & set(RESERVED_ENV))
    if reserved:
        raise ManifestError(f"spec.trainer.env sets {', '.join(reserved)}, which the torch runtime sets on each node")


def _difference(given: Any, read: Any, at: str = "") -> str:
    """The first path where the manifest and its reading differ."""
    if isinstance(given, dict) and isinstance(read, dict):
        for key in given.keys() | read.keys():
            if given.get(key) != read.get(key):
                return _difference(given.get(key), read.get(key), f"{at}.{key}" if at else key)
    if isinstance(given, list) and isinstance(read, list) and len(given) == len(read):
        for i, (a, b) in enumerate(zip(given, read, strict=True)):
            if a != b:
                return _difference(a, b, f"{at}[{i}]")
    return f"{at or 'the manifest'}: given {given!r}, read as {read!r}"
