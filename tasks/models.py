"""The typed, frozen objects that pass between lifecycle stages."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.spec import Method


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


StageStatus = Literal["passed", "skipped", "failed", "not run"]


class StageOutcome(Frozen):
    stage: str
    status: StageStatus
    detail: str = ""


class TokenStats(Frozen):
    min: int
    max: int
    mean: float
    p50: int
    p95: int


class DatasetReport(Frozen):
    source: str
    split: str
    format: Literal["messages", "prompt_completion", "text", "preference", "implicit_preference", "prompt_only"]
    rows: int
    columns: list[str]
    column_mapping: dict[str, str]
    tokens: TokenStats
    total_tokens: int
    max_length: int
    rows_over_max_length: int
    duplicates: int
    empty_turns: int
    warnings: list[str]
    prepared_path: str = Field(description="the validated training rows in canonical columns, as JSONL")
    train_rows: int
    heldout_path: str = Field(description="rows held out of training, to evaluate exported models")


class FlavorOption(Frozen):
    """One placement the planner considered, with why it was or was not chosen."""

    flavor: str
    mode: Literal["full", "lora", "qlora"]
    peak_memory_gb: float
    usable_memory_gb: float
    hours: float
    usd: float
    fits: bool
    why_not: str = ""
    memory_breakdown_gb: dict[str, float]


class HardwarePlan(Frozen):
    backend: str
    flavor: str
    description: str
    accelerator: str | None
    accelerator_count: int
    accelerator_memory_gb: float | None
    cpu_count: int
    ram_gb: float
    price_per_hour_usd: float
    peak_tflops: float
    parameters: int
    trainable_parameters: int
    dtype: Literal["float32", "bfloat16", "float16"]
    mode: Literal["full", "lora", "qlora"]
    use_lora: bool
    lora_reason: str
    seq_len: int
    gradient_checkpointing: bool
    memory_breakdown_gb: dict[str, float]
    estimated_peak_memory_gb: float
    available_memory_gb: float
    fits: bool
    alternatives: list[FlavorOption] = Field(default_factory=list)


class CostEstimate(Frozen):
    flavor: str
    price_per_hour_usd: float
    tokens: int
    estimated_flops: float
    utilisation: float
    startup_s: float
    hours: float
    hours_low: float
    hours_high: float
    usd: float
    usd_low: float
    usd_high: float
    basis: str


class Approval(Frozen):
    approved: bool
    by: Literal["auto", "user", "command line", "terminal"]
    reason: str
    max_usd: float
    estimated_usd: float


class TrainingScript(Frozen):
    path: str
    sha256: str
    method: Method
    trainer: str
    config: dict[str, Any]


class JobHandle(Frozen):
    backend: str
    job_id: str
    run_dir: str
    log_path: str
    started_at: datetime
    pid: int | None = None


class LossPoint(Frozen):
    step: int
    loss: float


class JobStatus(Frozen):
    state: Literal["completed", "failed", "cancelled"]
    detail: str
    duration_s: float
    steps: int
    max_steps: int | None
    losses: list[LossPoint]
    first_metrics: dict[str, float] = Field(default_factory=dict)
    last_metrics: dict[str, float]
    cost_usd: float


class JobResult(Frozen):
    model_dir: str
    adapter_dir: str | None
    files: list[str]
    size_mb: float
    train_metrics: dict[str, float]


class GgufFile(Frozen):
    """One GGUF file and what its smoke test measured."""

    quant: str
    path: str
    size_mb: float
    sha256: str
    load_s: float | None = None
    tokenization_matches: int = 0
    tokenization_checked: int = 0
    top1_agreement: float | None = None
    perplexity: float | None = None
    hf_perplexity: float | None = None
    generation_tokens_per_s: float | None = None
    sample_generation: str | None = None
    passed: bool = False
    problems: list[str] = Field(default_factory=list)


class GgufFiles(Frozen):
    outcome: StageOutcome
    files: list[GgufFile] = Field(default_factory=list)
    modelfile: str | None = None
    convert_s: float | None = None


class PublishedModel(Frozen):
    outcome: StageOutcome
    repo: str | None = None
    url: str | None = None


class RunPlan(Frozen):
    """Everything decided before money is spent: what --dry-run prints."""

    run_name: str
    run_dir: str
    method: Method
    model: str
    model_path: str
    dataset: DatasetReport
    hardware: HardwarePlan
    cost: CostEstimate
    script: TrainingScript


class RunSummary(Frozen):
    """What the flow returns and the report shows."""

    run_name: str
    run_dir: str
    plan: RunPlan
    approval: Approval | None = None
    job: JobStatus | None = None
    result: JobResult | None = None
    gguf: GgufFiles | None = None
    published: PublishedModel | None = None
    stages: list[StageOutcome]
    outputs: dict[str, str]
    error: str | None = None
