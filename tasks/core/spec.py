"""The run spec: what a user (or an agent) asks for, validated before anything runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.errors import UserFacingError

Method = Literal["sft", "dpo", "orpo", "kto", "reward", "grpo", "rloo"]
Backend = Literal["local", "hf-jobs", "prefect-pool", "kubernetes"]
GgufType = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k"]

RUN_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class SpecError(UserFacingError, ValueError):
    """A run spec that cannot be used; the message names each bad field and what is allowed."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSettings(_Frozen):
    """``lora: auto|true|false`` or a mapping with ``enabled`` and PEFT overrides."""

    enabled: Literal["auto", "qlora"] | bool = "auto"
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto",
        description="auto: every linear layer of the language model, except MoE routers and the towers of "
        "a multimodal model; all-linear: PEFT's own; or a list of module names",
    )


class Budget(_Frozen):
    max_usd: float = Field(20.0, ge=0)
    auto_approve_usd: float = Field(2.0, ge=0)
    max_hours: float = Field(24.0, gt=0, description="placements whose time estimate may exceed this are not chosen")
    projection_margin: float = Field(
        0.10, ge=0, le=10, description="cancel a job whose projected cost passes max_usd by more than this share"
    )
    stall_minutes: float = Field(30.0, gt=0, description="cancel a job that prints no progress line for this long")

    @model_validator(mode="after")
    def _ordered(self) -> Budget:
        if self.auto_approve_usd > self.max_usd:
            raise ValueError(
                f"auto_approve_usd ({self.auto_approve_usd}) is above max_usd ({self.max_usd}); "
                "lower auto_approve_usd or raise max_usd"
            )
        return self


class Outputs(_Frozen):
    hub_repo: str | None = Field(None, description="owner/name on the Hub, or a local folder (./dir, /dir, file://dir)")
    gguf: list[GgufType] = Field(default_factory=lambda: ["q4_k_m", "q8_0"])
    private: bool = True
    license: str = Field("apache-2.0", description="the model card's license (a Hub license id)")
    gguf_strict: bool = Field(
        False, description="refuse a k-quant the model's row sizes cannot take instead of letting rows fall back"
    )
    gguf_min_agreement: dict[GgufType, float] = Field(
        default_factory=dict,
        description="per type, the top-1 agreement with the trained model a file needs to be published "
        "(defaults: f16 0.98, q8_0 0.95, q6_k 0.9, q5_k_m 0.85, q4_k_m 0.8, q4_0 0.75, q3_k_m 0.6, q2_k 0.4)",
    )
    gguf_max_perplexity_ratio: dict[GgufType, float] = Field(
        default_factory=dict,
        description="per type, how much more perplexed than the trained model a file may be "
        "(defaults: f16 1.02, bf16 1.05, q8_0 1.05, others 1.5)",
    )


class Evaluation(_Frozen):
    """Before/after evaluation on held-out rows: is the trained model better than its base?"""

    held_out: float = Field(
        0.05, ge=0, description="rows kept out of training: a share (below 1) or a count; chosen with the spec's seed"
    )
    held_out_max: int = Field(64, ge=0, description="at most this many rows are held out for a share")
    dataset: str | None = Field(
        None, description="evaluate on this dataset (same format as the training data) instead of held-out rows"
    )
    split: str | None = Field(
        None, description="evaluate on this split (of `evaluation.dataset`, else of `dataset`): e.g. test"
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness task YAMLs on local data files, run on both models inside the job",
    )
    generations: int = Field(3, ge=0, le=20, description="held-out prompts answered by both models, side by side")
    noise_sigmas: float = Field(
        2.0, gt=0, description="the noise band: this many standard errors of the mean paired change"
    )
    baseline: str | None = Field(
        None,
        description="also compare the trained model with this model (a folder or Hub id) on the same rows; a "
        "recipe sets it to its base model, so that every stage is judged against where the chain began",
    )
    max_regression: float | None = Field(
        0.0,
        ge=0,
        description="the publish stops when the trained model is worse than the base beyond the noise band by more "
        "than this share of the base's score (0.05 = 5%); null publishes whatever the verdict",
    )


class Distributed(_Frozen):
    """How many training processes, and how they share the model (accelerate launches them)."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="auto: data parallel (ddp, every GPU holds the whole model state) when it fits, else sharded "
        "(fsdp full shard: parameters, gradients and optimizer state divided among the GPUs)",
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=8,
        description="training processes per node; default one per GPU of the flavor, one on a CPU. On this machine's "
        "CPU, 2 runs data parallel over gloo (the multi-GPU path, tried without a GPU)",
    )
    nodes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="machines of the flavor the run trains on, sharded (fsdp) across all their GPUs; default: one, "
        "or with backend: kubernetes as many as the cheapest fit needs",
    )
    offload: Literal["auto", "on", "off"] = Field(
        "auto",
        description="FSDP's CPU offload of the parameter shards with their gradients and optimizer state (the "
        "optimizer step runs on the host): auto weighs it against more GPUs and keeps it only when cheaper or the "
        "only fit; on forces it (fsdp), off never",
    )


class PoolSettings(_Frozen):
    """Where `backend: prefect-pool` sends the training step, and where both sides keep the run's files."""

    deployment: str = Field(
        "finetune-train/train",
        description="the training deployment (flow/deployment) a worker of the pool picks up; "
        "`python -m deployments.train_worker` registers it",
    )
    storage: str | None = Field(
        None,
        description="fsspec URL that this machine and the pool's workers both reach: a shared path or file:// "
        "URL here, s3://bucket/prefix or gs://... in production; the run's inputs and outputs go there. "
        "Default: $FINETUNE_POOL_STORAGE",
    )
    work_queue: str | None = Field(
        None, description="a work queue of the deployment's pool (e.g. one whose workers have H100s); default: its own"
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="per-run job variables of the pool (e.g. {gpu_count: 4, image: ...})"
    )


class KubernetesSettings(_Frozen):
    """Where `backend: kubernetes` runs the training: a Kubeflow Trainer TrainJob, one pod per node,
    each running torchrun through the cluster's torch runtime, all of them in one job folder on a
    volume that this machine also reaches as `storage`."""

    namespace: str = Field("default", description="the namespace of the TrainJob and of the token's Secret")
    runtime: str = Field(
        "torch-distributed",
        description="the ClusterTrainingRuntime that launches each node (Kubeflow Trainer's torch runtime sets "
        "PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR for torchrun)",
    )
    image: str = Field(
        "ghcr.io/astral-sh/uv:python3.12-bookworm",
        description="the nodes' image: with uv, `uv run train.py` installs the versions pinned in the script's "
        "header; or an image with them installed (deployments/k8s/Dockerfile)",
    )
    storage: str | None = Field(
        None,
        description="fsspec URL of the volume's root as this machine reaches it (a shared path here, "
        "s3://bucket/prefix or gs://... in production). Default: $FINETUNE_K8S_STORAGE",
    )
    volume_claim: str = Field(
        "finetune-runs", description="the PersistentVolumeClaim (ReadWriteMany) the nodes mount: the same storage"
    )
    mount_path: str = Field("/workspace", description="where the nodes see the volume's root")
    token_secret: str | None = Field(
        "hf-token",
        description="a Secret with the Hugging Face token under the key `token`, passed to the nodes as HF_TOKEN "
        "by reference (never in the manifest); null for none",
    )
    run_with: Literal["uv", "python"] = Field(
        "uv",
        description="how a node runs the script: uv (installs the versions pinned in its header, for an image with "
        "uv) or python (an image with them installed)",
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="the nodes' GPU resource name")
    context: str | None = Field(None, description="the kubeconfig context; default: the current one, or in-cluster")


BackendSettings = PoolSettings | KubernetesSettings


class RunSpec(_Frozen):
    """One fine-tuning run. Same fields as YAML and as flow parameters."""

    method: Method = "sft"
    model: str = "tiny"
    dataset: str
    split: str = "train"
    columns: dict[str, str] = Field(
        default_factory=dict, description="mapping canonical column -> your column, e.g. {messages: conversation}"
    )
    conversion: str | None = Field(
        None,
        description="a named conversion into the method's columns (sharegpt, alpaca, hh_rlhf, ultrafeedback); "
        "`python -m flows.inspect DATASET` says which one a dataset needs",
    )
    hardware: str = "auto"
    backend: Backend = "local"
    distributed: Distributed = Field(default_factory=Distributed)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    vision_tower: Literal["frozen", "trained"] = Field(
        "frozen",
        description="a vision-language model's vision tower and projector: frozen (the language model learns to read "
        "what the pretrained tower sees), or trained in full beside the language model (or its LoRA adapter)",
    )
    training: dict[str, Any] = Field(default_factory=dict, description="passed through to the TRL config")
    budget: Budget = Field(default_factory=Budget)
    outputs: Outputs = Field(default_factory=Outputs)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    rewards: list[str] = Field(default_factory=list)
    flavors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="hardware catalogue overrides, e.g. {a100-large: {price_per_hour: 2.2}}"
    )
    name: str | None = Field(None, description="run name; the run folder is runs/<name>")
    seed: int = 42

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_shorthand(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in ("auto", "qlora"):
            return {"enabled": v}
        return v

    @field_validator("name")
    @classmethod
    def _name_is_folder_safe(cls, v: str | None) -> str | None:
        if v is not None and not RUN_NAME_PATTERN.match(v):
            raise ValueError(
                "must be 1-64 characters of lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v


def _describe(err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "(spec)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and field == "requires":
        return (
            "'requires' was replaced by recipes: write the stages (for example an SFT warm-up, then GRPO) in "
            "one recipe file, as examples/grpo-tiny.yaml does, and run it with python -m flows.recipe"
        )
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else ""
        return f"unknown field '{field}'; allowed fields here: {allowed}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"field '{field}': {msg}{shown}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def parse_spec(data: dict[str, Any], source: str = "spec") -> RunSpec:
    """Validate a mapping into a RunSpec, turning pydantic's errors into one readable message."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a run spec must be a mapping of fields, got {type(data).__name__}")
    try:
        return RunSpec.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise SpecError(f"{source} is not a valid run spec:\n  - " + "\n  - ".join(lines)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins, key by key, down through nested mappings (so `training.max_steps`
    overrides one setting without dropping the others)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _spec_relative(value: str, base: Path) -> bool:
    """`./x` and `../x` always mean next to the spec; a bare relative name does when it exists
    there and not in the working directory (an `owner/name` Hub id never does)."""
    if value.startswith(("./", "../")):
        return True
    return not Path(value).is_absolute() and not Path(value).exists() and (base / value).is_dir()


def read_yaml(path: Path, kind: str) -> Any:
    """A spec or recipe file's YAML, with a SpecError that names the file when it is missing or broken."""
    if not path.exists():
        raise SpecError(f"{kind} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None


def load_spec(
    path: str | Path, overrides: dict[str, Any] | None = None, default_method: Method | None = None
) -> RunSpec:
    """Load a YAML spec. Paths in it (dataset, model folder, reward files, a local publish
    folder) are resolved against the spec file's folder, so specs work from any working
    directory."""
    path = Path(path)
    data = read_yaml(path, "spec")
    if isinstance(data, dict):
        data = deep_merge(data, overrides or {})
        if default_method is not None:
            data.setdefault("method", default_method)
        if "stages" in data:
            raise SpecError(f"{path} is a recipe (it lists stages); run it with python -m flows.recipe --spec {path}")
        data = resolve_spec_paths(data, path.parent)
    return parse_spec(data, source=str(path))


def resolve_spec_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Paths in a spec mapping (dataset, evaluation dataset, model folder, reward files, a local
    publish folder) resolved against the folder of the file they were written in."""
    data = dict(data)
    ds = data.get("dataset")
    if isinstance(ds, str) and not Path(ds).is_absolute() and not Path(ds).exists():
        candidate = (base / ds).resolve()
        if candidate.exists():
            data["dataset"] = str(candidate)
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict):
        for key in ("dataset", "baseline"):
            value = evaluation.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists():
                if (base / value).exists():
                    evaluation = {**evaluation, key: str((base / value).resolve())}
        if isinstance(evaluation.get("tasks"), list):
            evaluation = {
                **evaluation,
                "tasks": [
                    str((base / t).resolve())
                    if isinstance(t, str) and not Path(t).is_absolute() and (base / t).exists()
                    else t
                    for t in evaluation["tasks"]
                ],
            }
        data["evaluation"] = evaluation
    model = data.get("model")
    if isinstance(model, str) and _spec_relative(model, base):
        data["model"] = str((base / model).resolve())
    for block in ("pool", "kubernetes"):  # a shared folder, next to the spec
        settings = data.get(block)
        if isinstance(settings, dict) and str(settings.get("storage", "")).startswith(("./", "../")):
            data[block] = {**settings, "storage": str((base / settings["storage"]).resolve())}
    outputs = data.get("outputs")
    if isinstance(outputs, dict) and isinstance(outputs.get("hub_repo"), str):
        if outputs["hub_repo"].startswith(("./", "../")):  # a local publish folder, next to the spec
            data["outputs"] = {**outputs, "hub_repo": str((base / outputs["hub_repo"]).resolve())}
    rewards = data.get("rewards")
    if isinstance(rewards, list):  # reward files, like the dataset, may be relative to the spec
        resolved = []
        for r in rewards:
            file, sep, fn = str(r).rpartition(":")
            if sep and file.endswith(".py") and not Path(file).is_absolute() and not Path(file).exists():
                candidate = (base / file).resolve()
                r = f"{candidate}:{fn}" if candidate.exists() else r
            elif not sep and not Path(str(r)).exists() and (base / str(r)).is_dir():  # a reward model's folder
                r = str((base / str(r)).resolve())
            resolved.append(r)
        data["rewards"] = resolved
    return data


# The backends that train on this machine: planning sizes this machine rather than a rented
# flavor (each backend class takes its `on_this_machine` from here).
ON_THIS_MACHINE = frozenset({"local"})


def backend_settings(spec: RunSpec) -> BackendSettings | None:
    """The spec's block for its backend, if the backend has one."""
    return {"prefect-pool": spec.pool, "kubernetes": spec.kubernetes}.get(spec.backend)


def runs_on_this_machine(backend: str) -> bool:
    """Whether planning sizes this machine (local) or a rented flavor (every other backend)."""
    return backend in ON_THIS_MACHINE
