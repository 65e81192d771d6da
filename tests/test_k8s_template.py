"""The Kubernetes GPU pool (deployments/k8s): its base job template passes the checks Prefect's
server runs when the pool is created and the deployment applied, and prefect-kubernetes' own
job configuration renders it, for a flow run, into a Job with the GPUs, node selector,
tolerations and image. The server never reads the job manifest itself (a template without
one is accepted and fails in the worker on every run), so the worker's model is the check
that matters; no cluster is needed for either."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any
from uuid import uuid4

import pydantic
import pytest
import yaml

from tests.helpers import REPO

K8S = REPO / "deployments" / "k8s"
POOL = "finetune-gpu"


class _NoAPI:
    """Rendering this template must not need the Prefect API (no block or variable placeholders)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the template needed the Prefect API ({name})")


def _template() -> dict[str, Any]:
    return json.loads((K8S / "gpu-job-template.json").read_text())


def _deployment_variables() -> dict[str, Any]:
    (train,) = yaml.safe_load((K8S / "prefect.yaml").read_text())["deployments"]
    assert train["name"] == "train" and train["entrypoint"] == "flows/train_job.py:train_job"
    assert train["work_pool"]["name"] == POOL
    return train["work_pool"]["job_variables"]


def _server_accepts_pool(template: dict[str, Any]) -> None:
    """What POST /work_pools/ runs (`prefect work-pool create --base-job-template`)."""
    from prefect.server.api.validation import validate_job_variable_defaults_for_work_pool
    from prefect.server.schemas import actions

    actions.WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=template)
    asyncio.run(validate_job_variable_defaults_for_work_pool(None, POOL, template))


def _server_accepts_deployment(template: dict[str, Any], job_variables: dict[str, Any]) -> None:
    """What POST /deployments/ runs on a deployment's job variables (`prefect deploy`)."""
    from prefect.server.api.validation import validate_job_variables_for_deployment
    from prefect.server.schemas import actions, core

    pool = core.WorkPool(name=POOL, type="kubernetes", base_job_template=template)
    deployment = actions.DeploymentCreate(name="train", flow_id=uuid4(), job_variables=job_variables)
    asyncio.run(validate_job_variables_for_deployment(None, pool, deployment))


def _render(template: dict[str, Any], job_variables: dict[str, Any]) -> Any:
    """What the kubernetes worker does for each flow run: fill the template, validate the Job
    (prefect-kubernetes' model), and prepare it for the run."""
    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(
            base_job_template=template, values=job_variables, client=_NoAPI()
        )
    )
    flow = Flow(id=uuid4(), name="finetune-train")
    run = FlowRun(id=uuid4(), name="tiny-sft-train-1", flow_id=flow.id, job_variables=job_variables)
    pool = WorkPool(name=POOL, type="kubernetes", base_job_template=template)
    config.prepare_for_flow_run(flow_run=run, flow=flow, work_pool=pool, worker_name="gpu-worker")
    return config


def test_the_gpu_template_keeps_every_stock_variable_and_passes_the_servers_checks():
    from prefect_kubernetes.worker import KubernetesWorker

    template = _template()
    stock = KubernetesWorker.get_default_base_job_template()["variables"]["properties"]
    assert set(stock) <= set(template["variables"]["properties"])
    _server_accepts_pool(template)
    _server_accepts_deployment(template, _deployment_variables())


def test_a_run_of_four_gpus_renders_into_a_job_on_a_gpu_node():
    # the prefect-pool backend sets gpu_count to the plan's processes on top of the deployment's variables
    variables = {**_deployment_variables(), "gpu_count": 4}
    config = _render(_template(), variables)
    pod = config.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job" and container["image"] == variables["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["memory"] == "64Gi"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["envFrom"] == [{"secretRef": {"name": "finetune-storage", "optional": True}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]  # NCCL needs shared memory
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_FLOW_HOME"] == "/opt/finetune-flow" and "PREFECT__FLOW_RUN_ID" in env
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]
    assert pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("bad", [{"gpu_count": 0}, {"gpu_count": 9}, {"gpu_count": "two"}])
def test_the_server_refuses_gpu_counts_the_template_does_not_allow(bad):
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as e:
        _server_accepts_deployment(_template(), bad)
    assert e.value.status_code == 422 and "gpu_count" in e.value.detail


def test_a_broken_job_manifest_passes_the_server_but_not_the_worker():
    template = copy.deepcopy(_template())
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    _server_accepts_pool(template)  # the server cannot tell ...
    with pytest.raises(pydantic.ValidationError, match="containers/0/name must have value 'prefect-job'"):
        _render(template, {})  # ... the worker's model can, which is why this test renders


def test_an_undeclared_placeholder_is_refused_when_the_pool_is_created():
    template = copy.deepcopy(_template())
    limits = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    limits["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    with pytest.raises(pydantic.ValidationError, match="undeclared variable.*gpus"):
        _server_accepts_pool(template)
