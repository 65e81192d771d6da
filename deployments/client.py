"""A typed client for the REST door: exactly the calls an agent or a script makes to drive a
run on a Prefect server where the deployments live (`prefect deploy --all`, or
`python -m deployments.serve`).

    find the deployment     GET  /api/deployments/name/{flow}/{deployment}
    start a run             POST /api/deployments/{id}/create_flow_run   {"parameters": {"spec": {...}}}
    read its state          GET  /api/flow_runs/{id}
    what a pause waits for  GET  /api/flow_runs/{id}/input/finetune-pending-{spend|publish}
    answer the pause        POST /api/flow_runs/{id}/resume              {"run_input": {"approve": true}}
    read its artifacts      POST /api/artifacts/filter                   {"artifacts": {"flow_run_id": {"any_": [id]}}}
    read its logs           POST /api/logs/filter                        {"logs": {"flow_run_id": {"any_": [id]}}}
    cancel it               POST /api/flow_runs/{id}/set_state           {"state": {"type": "CANCELLING"}, "force": true}

Each call goes through Prefect's own client (retries, auth, the API URL from
PREFECT_API_URL); this module adds only the typed results and the rules of this product: a
paused run says what it waits for and the estimate, and an answer may not raise the spending
cap above the spec's budget.max_usd.
"""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.errors import UserFacingError
from tasks.core.methods import METHODS
from tasks.core.money import usd
from tasks.stages.approval import PENDING_INPUT_KEY, PendingDecision

METHOD_DEPLOYMENTS = {method: f"{method}/{method}" for method in METHODS}
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class ServerUnreachable(UserFacingError, RuntimeError):
    """No Prefect server answers at the configured API URL."""


class DeploymentNotFound(UserFacingError, LookupError):
    """The named deployment does not exist on the server."""


class AnswerRefused(UserFacingError, RuntimeError):
    """The answer would break a rule (the run is not paused, or the cap is above the spec's)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DeploymentRef(_Frozen):
    id: str
    name: str = Field(description='"flow/deployment", e.g. "sft/sft"')
    work_pool: str | None = Field(None, description="the pool whose worker runs it; None when served by a process")
    parameters: dict[str, Any] = Field(description="the deployment's default parameters")


class RunRef(_Frozen):
    flow_run_id: str
    name: str
    deployment: str


class ArtifactView(_Frozen):
    key: str | None
    type: str | None = Field(description='"markdown", "table" or "progress"')
    description: str | None
    data: Any = Field(description="markdown text, table rows, or a progress percentage")


class RunStatus(_Frozen):
    flow_run_id: str
    name: str
    state: str = Field(description="Prefect's state type: SCHEDULED, PENDING, RUNNING, PAUSED, COMPLETED, FAILED, ...")
    state_name: str = Field(description='the state\'s name, e.g. "Suspended" or "Paused" while it waits')
    final: bool = Field(description="true once the run can change no more")
    needs: PendingDecision | None = Field(None, description="what a paused run waits for; None otherwise")
    progress_percent: float | None = Field(None, description="training progress from the run's progress artifact")
    message: str | None = Field(None, description="the state's message (why it failed, for instance)")
    summary: str = Field(description="one line for a person: the state, and what to do when it waits")


class FinetuneClient:
    """Drives runs over the Prefect REST API. Use as a context manager, or call close()."""

    def __init__(self, api_url: str | None = None) -> None:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        if api_url:
            with temporary_settings({PREFECT_API_URL: api_url}):
                self._client = get_client(sync_client=True)
        else:
            self._client = get_client(sync_client=True)
        self._client.__enter__()
        self.api_url = str(self._client._client.base_url).rstrip("/")
        error = self._client.api_healthcheck()
        if error is not None:
            self.close()
            raise ServerUnreachable(
                f"no Prefect server answers at {self.api_url} ({error}). Start one with `prefect server start` "
                "and set PREFECT_API_URL=http://127.0.0.1:4200/api, or pass its URL"
            )

    def close(self) -> None:
        self._client.__exit__(None, None, None)

    def __enter__(self) -> FinetuneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- deployments -----------------------------------------------------------------------
    def find_deployment(self, name: str) -> DeploymentRef:
        """`name` is "flow/deployment" ("sft/sft", "recipe/sft-then-grpo") or a method name."""
        from prefect.exceptions import ObjectNotFound

        full = METHOD_DEPLOYMENTS.get(name, name)
        if "/" not in full:
            raise DeploymentNotFound(f"'{name}' is not a deployment name: give flow/deployment, e.g. sft/sft")
        try:
            d = self._client.read_deployment_by_name(full)
        except ObjectNotFound:
            known = sorted(
                f"{self._client.read_flow(x.flow_id).name}/{x.name}" for x in self._client.read_deployments()
            )
            raise DeploymentNotFound(
                f"no deployment '{full}' on {self.api_url}; it has: {', '.join(known) or 'none'}. Create them "
                "with `prefect deploy --all` (and a worker) or `python -m deployments.serve`"
            ) from None
        return DeploymentRef(id=str(d.id), name=full, work_pool=d.work_pool_name, parameters=d.parameters)

    def recipe_deployment(self) -> str:
        """The recipe flow's deployment: `recipe/recipe` as deployments.serve names it, or the one
        prefect.yaml declares (`recipe/sft-then-grpo`); any of them runs any recipe it is given."""
        names = []
        for d in self._client.read_deployments():
            flow = self._client.read_flow(d.flow_id).name
            if flow == "recipe":
                names.append(f"recipe/{d.name}")
        if not names:
            raise DeploymentNotFound(
                f"no deployment of the recipe flow on {self.api_url}. Create them with `prefect deploy --all` (and a "
                "worker) or `python -m deployments.serve`"
            )
        return "recipe/recipe" if "recipe/recipe" in names else sorted(names)[0]

    def start_run(
        self,
        deployment: str,
        spec: dict[str, Any] | BaseModel | None = None,
        *,
        dry_run: bool = False,
        approve_up_to_usd: float | None = None,
        approval_timeout_s: int | None = None,
        name: str | None = None,
    ) -> RunRef:
        """Creates a flow run of the deployment; a worker (or `deployments.serve`) picks it up.
        Parameters left out keep the deployment's defaults."""
        d = self.find_deployment(deployment)
        parameters: dict[str, Any] = {"dry_run": dry_run}
        if spec is not None:  # a recipe deployment's parameter is `recipe`, a method's `spec`
            key = "recipe" if d.name.startswith("recipe/") else "spec"
            parameters[key] = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, BaseModel) else spec
        if approve_up_to_usd is not None:
            parameters["approve_up_to_usd"] = approve_up_to_usd
        if approval_timeout_s is not None:
            parameters["approval_timeout_s"] = approval_timeout_s
        run = self._client.create_flow_run_from_deployment(UUID(d.id), parameters=parameters, name=name)
        return RunRef(flow_run_id=str(run.id), name=run.name, deployment=d.name)

    # -- following ----------------------------------------------------------------------
    def _paused_child(self, flow_run_id: str) -> str | None:
        """A recipe's stages are child flow runs: the parent runs on while a stage waits."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterParentFlowRunId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        children = self._client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(flow_run_id)]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
            )
        )
        return str(children[0].id) if children else None

    def pending(self, flow_run_id: str) -> PendingDecision | None:
        """What a paused run (or a paused stage of a recipe run) waits for, or None. Its
        `flow_run_id` is the run to resume: the stage's own, for a recipe."""
        return self._pending_of(self._client.read_flow_run(UUID(flow_run_id)))

    def _pending_of(self, run: Any) -> PendingDecision | None:
        from prefect.exceptions import PrefectHTTPStatusError

        state = run.state.type.value if run.state is not None else None
        if state == "RUNNING":
            child = self._paused_child(str(run.id))
            return self.pending(child) if child else None
        if state != "PAUSED":
            return None
        found: list[PendingDecision] = []
        for kind in ("spend", "publish"):
            try:
                raw = self._client.read_flow_run_input(run.id, PENDING_INPUT_KEY.format(kind=kind))
            except PrefectHTTPStatusError as e:
                if e.response.status_code != 404:
                    raise
                continue  # not asked (yet)
            found.append(PendingDecision.model_validate_json(raw))
        # a run asks for the spend first and the publish later: the later question is the open one
        return found[-1] if found else None

    def status(self, flow_run_id: str) -> RunStatus:
        run = self._client.read_flow_run(UUID(flow_run_id))
        state = run.state.type.value if run.state else "PENDING"
        needs = self._pending_of(run)
        progress = [a for a in self.artifacts(flow_run_id) if a.type == "progress"]
        percent = float(progress[-1].data) if progress else None
        if needs is not None and needs.kind == "spend":
            summary = (
                f"needs approval: estimated {usd(needs.estimated_usd or 0.0)} "
                f"(up to {usd(needs.estimated_usd_high or 0.0)}, cap {usd(needs.max_usd or 0.0)}); ask the user"
            )
        elif needs is not None:
            summary = f"needs a decision on publishing: {needs.question}"
        else:
            summary = state.lower() + (
                f" ({percent:.0f}% trained)" if percent is not None and state == "RUNNING" else ""
            )
            if run.state and run.state.message and state in ("FAILED", "CRASHED"):
                summary += f": {run.state.message}"
        return RunStatus(
            flow_run_id=flow_run_id,
            name=run.name,
            state=state,
            state_name=run.state.name if run.state else "Pending",
            final=state in FINAL,
            needs=needs,
            progress_percent=percent,
            message=run.state.message if run.state else None,
            summary=summary,
        )

    def wait(
        self,
        flow_run_id: str,
        until: tuple[str, ...] = (*FINAL, "PAUSED"),
        timeout_s: float = 600,
        poll_s: float = 2,
    ) -> RunStatus:
        """Polls until the run reaches one of `until` (a final state or a pause, by default)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(flow_run_id)
            if status.needs is not None and "PAUSED" in until:
                return status  # the run, or a stage of it, waits for a decision
            if status.state in until and status.state != "PAUSED":
                return status
            if status.final or time.monotonic() > deadline:
                return status
            time.sleep(poll_s)

    def artifacts(self, flow_run_id: str) -> list[ArtifactView]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        found = self._client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
        )
        out = []
        for a in sorted(found, key=lambda a: a.created or 0):
            data = a.data
            if a.type == "table" and isinstance(data, str):
                data = json.loads(data)
            out.append(ArtifactView(key=a.key, type=a.type, description=a.description, data=data))
        return out

    def report(self, flow_run_id: str) -> str | None:
        """The run report's markdown, once the run has written it."""
        reports = [a for a in self.artifacts(flow_run_id) if (a.key or "").startswith(("report-", "recipe-"))]
        return str(reports[-1].data) if reports else None

    def logs(self, flow_run_id: str, limit: int = 200) -> list[str]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        found = self._client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])),
            limit=limit,
            sort=LogSort.TIMESTAMP_DESC,
        )
        return [f"{log.timestamp:%H:%M:%S} {log.message}" for log in reversed(found)]

    # -- acting ------------------------------------------------------------------------
    def answer(
        self, flow_run_id: str, approve: bool, reason: str = "", max_usd: float | None = None
    ) -> PendingDecision:
        """Answers the open question of a paused run: approve (or decline) the spend, or
        publish (or not) a model that got worse. A cap above the spec's max_usd is refused."""
        needs = self.pending(flow_run_id)
        if needs is None:
            state = self.status(flow_run_id)
            raise AnswerRefused(f"run {state.name} is not waiting for a decision (it is {state.state_name})")
        if needs.kind == "spend":
            if max_usd is not None and needs.max_usd is not None and max_usd > needs.max_usd:
                raise AnswerRefused(
                    f"max_usd {usd(max_usd)} is above the spec's budget.max_usd {usd(needs.max_usd)}: only the spec's "
                    "owner raises the cap (edit the spec and start a new run)"
                )
            run_input: dict[str, Any] = {"approve": approve, "reason": reason}
            if max_usd is not None:
                run_input["max_usd"] = max_usd
        else:
            run_input = {"publish": approve, "reason": reason}
        result = self._client.resume_flow_run(UUID(needs.flow_run_id), run_input=run_input)
        if result.status.value != "ACCEPT":
            raise AnswerRefused(f"the server refused the answer: {result.details}")
        return needs

    def cancel(self, flow_run_id: str) -> RunStatus:
        """Asks the worker (or serve process) to stop the run; its job is cancelled by the
        flow's cancellation hook, and its checkpoints stay."""
        from prefect.states import Cancelling

        self._client.set_flow_run_state(UUID(flow_run_id), Cancelling(), force=True)
        return self.status(flow_run_id)


def connect(api_url: str | None = None) -> FinetuneClient:
    """`with connect() as api:`, the API URL from PREFECT_API_URL unless given."""
    return FinetuneClient(api_url)
