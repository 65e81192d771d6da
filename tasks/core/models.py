"""The typed, frozen objects that pass between lifecycle stages."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.spec import Method


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


StageStatus = Literal["passed", "cached", "skipped", "failed", "not run"]


class FrozenOpen(BaseModel):
    """Frozen, and tolerant of fields it does not know (records the job writes may grow)."""

    model_config = ConfigDict(frozen=True)


# -- the evaluation's results (tasks/evaluate) --------------------------------------------


class HarnessTask(BaseModel):
    """One task as the job runs it: the harness's own config, its data files copied into the
    run folder (paths relative to the script), and the metric the verdict is on."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str = Field(description="the task YAML the spec named")
    output_type: str
    rows: int = Field(description="rows in the split the harness evaluates")
    metric: str = Field(description="the first metric of metric_list: the verdict is on it")
    higher_is_better: bool = True
    config: dict[str, Any] = Field(description="the harness task config; data_files relative to the script")
    scored_tokens: int = Field(0, description="about how many tokens the harness scores per model")
    generated_tokens: int = Field(0, description="at most how many tokens it generates per model")


class TaskComparison(BaseModel):
    """The base and trained model's score on one task, row by row paired, with the noise band."""

    model_config = ConfigDict(frozen=True)

    task: str
    metric: str
    rows: int
    base: float
    trained: float
    change: float = Field(description="mean paired change, oriented so that positive is better")
    noise_band: float
    verdict: Literal["improved", "no change", "worse"]
    higher_is_better: bool = True
    base_stderr: float | None = None
    trained_stderr: float | None = None


Verdict = Literal["improved", "no change", "worse"]


class MetricComparison(FrozenOpen):
    name: str
    base: float | None
    trained: float | None
    better: Literal["lower", "higher"]


class GenerationPair(FrozenOpen):
    prompt: str
    base: str
    trained: str


class EvaluationResult(FrozenOpen):
    method: str
    rows: int = Field(description="held-out rows both models were scored on")
    seconds: float = Field(description="evaluation time inside the job, both models")
    primary: str = Field(description="the score the verdict is on")
    base_score: float
    trained_score: float
    change: float = Field(description="mean paired change of the primary score, positive = better")
    noise_band: float = Field(description="+- this much is within noise")
    relative_change: float = Field(description="change / |base score|")
    verdict: Verdict
    metrics: list[MetricComparison]
    generations: list[GenerationPair] = Field(default_factory=list)
    non_finite_rows: int = Field(0, description="rows the trained model scored NaN or infinite (a diverged run)")
    tasks: list[TaskComparison] = Field(
        default_factory=list, description="the spec's task evaluations (lm-evaluation-harness), base against trained"
    )
    baseline_model: str | None = Field(None, description="the other model the trained one was compared with")
    baseline: EvaluationResult | None = Field(
        None, description="the same comparison against baseline_model (a recipe's base) instead of this run's start"
    )

    def sentence(self) -> str:
        sign = "+" if self.change >= 0 else ""
        broken = f"; the trained model scored NaN or infinity on {self.non_finite_rows}" if self.non_finite_rows else ""
        return (
            f"{self.verdict}: {self.primary} {self.base_score:.4g} -> {self.trained_score:.4g} "
            f"(change {sign}{self.change:.4g}, noise band +-{self.noise_band:.2g}, {self.rows} held-out rows{broken})"
        )


# -- the fast-path choices (tasks/plan/speed.py) --------------------------------------------

Batching = Literal["padded", "grouped", "padding_free", "packed"]


class SpeedChoice(BaseModel):
    model_config = ConfigDict(frozen=True)

    setting: str
    value: str
    reason: str


class SpeedPlan(BaseModel):
    """The fast-path choices for one placement and the TRL arguments they set."""

    model_config = ConfigDict(frozen=True)

    batching: Batching
    attention: str
    liger: bool
    choices: list[SpeedChoice]
    arguments: dict[str, Any] = Field(description="TRL config keys these choices set (the spec's own keys win)")

    def reason(self, setting: str) -> str:
        return next(c.reason for c in self.choices if c.setting == setting)


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


class ImageStats(Frozen):
    """The images of a vision dataset, as the model's processor will see them."""

    images: int
    rows_with_images: int
    rows_without_images: int = Field(description="text-only rows in a vision set: allowed, and counted")
    tokens_per_image_min: int
    tokens_per_image_max: int
    tokens_per_image_mean: float
    image_tokens: int = Field(description="the tokens all images become, counted by the model's processor")
    far_larger: int = Field(0, description="images with many times the pixels the processor keeps (resized down)")
    far_larger_example: str = ""
    staged: str = Field(description="the folder the checked images were copied to, beside the prepared rows")


class DatasetReport(Frozen):
    source: str
    split: str
    format: Literal[
        "vision",
        "vision_preference",
        "messages",
        "prompt_completion",
        "text",
        "preference",
        "implicit_preference",
        "unpaired",
        "prompt_only",
    ]
    rows: int
    columns: list[str]
    column_mapping: dict[str, str]
    conversion: str | None = Field(None, description="the named conversion applied before validation")
    verdicts: dict[str, str] = Field(
        default_factory=dict,
        description="per method, what the data as given needs (READY / NEEDS MAPPING with spec lines / INCOMPATIBLE)",
    )
    tokens: TokenStats
    total_tokens: int
    max_length: int
    rows_over_max_length: int
    tokens_truncated: int = Field(0, description="tokens that truncation at max_length cuts, over the measured rows")
    heldout_rows: int = Field(0, description="rows the before/after evaluation and the GGUF smoke test use")
    heldout_source: str = Field("", description="where they come from: held out of the training rows, or a split")
    length_percentiles: list[int] = Field(
        default_factory=list, description="token length at percentiles 0, 1, ..., 100 of the measured rows"
    )
    length_histogram: list[tuple[int, int, int]] = Field(
        default_factory=list, description="token-length bins (from, to, rows), over the measured rows"
    )
    token_rows_measured: int = Field(0, description="rows tokenized: all of them, or a seeded uniform sample")
    check_seconds: float = Field(0.0, description="time to read and schema-check every row (tokenizing excluded)")
    check_processes: int = Field(1, description="processes that checked the rows: this one, or its workers")
    duplicates: int
    empty_turns: int
    role_anomalies: dict[str, int] = Field(
        default_factory=dict, description="legal but worth a look, e.g. conversations ending with a user turn"
    )
    warnings: list[str]
    token_counts: Literal["measured", "estimated"] = Field(
        "measured", description="estimated when the model's tokenizer cannot encode: a real run refuses such a plan"
    )
    prepared_path: str = Field(description="the validated training rows in canonical columns, as JSONL")
    train_rows: int
    heldout_path: str = Field(description="rows held out of training, to evaluate exported models")
    images: ImageStats | None = Field(None, description="vision rows: their images, counted by the processor")


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
    gradient_checkpointing: bool = False
    checkpointing_reason: str = ""
    micro_batch: int = 1
    accumulation: int = 1
    batch_reason: str = ""
    speed: SpeedPlan | None = None
    padding_overhead: float = 1.0
    memory_factor: float = 1.0
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    processes: int = 1
    nodes: int = 1
    offload: bool = False
    host_memory_gb: float = 0.0
    usable_host_memory_gb: float = 0.0
    strategy_reason: str = ""


class SplitRate(Frozen):
    """One batch split timed on this machine by the script's own probe (finetune_probe.py)."""

    micro_batch: int
    accumulation: int
    padding_free: bool = False
    steps: int = Field(description="optimizer steps timed (after one untimed)")
    seconds: float
    real_tokens: int
    computed_tokens: int = Field(description="padding included")
    warmup_s: float = Field(0.0, description="the first, untimed step: kernels and caches built")

    @property
    def first_step_extra_s(self) -> float:
        """What a run's first step takes beyond a timed one."""
        return max(0.0, self.warmup_s - self.seconds / max(self.steps, 1))

    @property
    def seconds_per_computed_token(self) -> float:
        return self.seconds / max(self.computed_tokens, 1)

    @property
    def real_tokens_per_s(self) -> float:
        return self.real_tokens / max(self.seconds, 1e-9)

    @property
    def label(self) -> str:
        kind = "padding-free batches of" if self.padding_free else "micro-batch"
        return f"{kind} {self.micro_batch} x {self.accumulation}"


class SplitProbe(Frozen):
    """The candidate splits measured where the run trains, or why none was."""

    rates: list[SplitRate] = Field(default_factory=list)
    seconds: float = Field(0.0, description="the probe's wall time, start-up included")
    cached: bool = Field(False, description="measured by an earlier plan of the same script, data and machine")
    note: str = Field("", description="why the probe did not run or failed; empty when it measured")

    def rate(self, micro_batch: int, padding_free: bool) -> SplitRate | None:
        return next((r for r in self.rates if (r.micro_batch, r.padding_free) == (micro_batch, padding_free)), None)


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
    lora_target_modules: list[str] | str = "all-linear"
    expert_parameters: int = Field(0, description="MoE experts: all held in memory, top-k compute per token")
    frozen_tower_parameters: int = Field(0, description="vision/audio towers of a multimodal model, kept frozen")
    trained_tower_parameters: int = Field(0, description="those towers when the spec's vision_tower is trained")
    tower_modules: list[str] = Field(default_factory=list, description="the towers' outermost modules, by name")
    dtype: Literal["float32", "bfloat16", "float16"]
    mode: Literal["full", "lora", "qlora"]
    use_lora: bool
    lora_reason: str
    seq_len: int
    gradient_checkpointing: bool
    checkpointing_reason: str = Field("", description="why activations are (not) recomputed: the memory model's call")
    micro_batch: int = Field(1, description="rows per forward pass (per_device_train_batch_size)")
    accumulation: int = Field(1, description="micro-batches per optimizer step (gradient_accumulation_steps)")
    batch_reason: str = Field("", description="why this split of the global batch: the memory model's call")
    speed: SpeedPlan = Field(
        description="batching, attention, precision, optimizer, kernels, data loading; each with why"
    )
    padding_overhead: float = Field(
        1.0,
        description="tokens computed per real token with this batching (padding), simulated on the measured lengths",
    )
    model_type: str = Field("", description="the model family (config model_type): calibration is kept per family")
    memory_factor: float = Field(1.0, description="measured / modelled peak memory of earlier runs like this one")
    memory_breakdown_gb: dict[str, float] = Field(
        description="per GPU (per process); on a CPU, the whole machine with all its processes"
    )
    estimated_peak_memory_gb: float
    available_memory_gb: float
    fits: bool
    alternatives: list[FlavorOption] = Field(default_factory=list)
    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single", description="single process; ddp: data parallel; fsdp: sharded (full shard)"
    )
    processes: int = Field(
        1, description="training processes, every node's: one per GPU used (accelerate launches them)"
    )
    nodes: int = Field(1, description="machines of the flavor, alike; the price is every node's")
    offload: bool = Field(
        False, description="FSDP's CPU offload: parameter shards, gradients and optimizer state on the host"
    )
    host_memory_breakdown_gb: dict[str, float] = Field(
        default_factory=dict, description="what each node's host memory holds, with offload"
    )
    available_host_memory_gb: float = Field(0.0, description="each node's host memory, less the safety margin")
    strategy_reason: str = Field("", description="why this strategy and process count")
    layer_classes: list[str] = Field(
        default_factory=list, description="the decoder layer class(es) FSDP wraps one by one (_no_split_modules)"
    )
    split_probe: SplitProbe | None = Field(None, description="the batch splits timed on this machine, if probed")

    @property
    def measured_split(self) -> SplitRate | None:
        """The chosen split's measured rate, when the probe timed it."""
        if self.split_probe is None:
            return None
        return self.split_probe.rate(self.micro_batch, self.speed.batching == "padding_free")

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step, all processes together."""
        return self.micro_batch * self.accumulation * self.processes


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
    upload_s: float = Field(0.0, description="uploading inputs before the job starts; wall time, not billed")
    compute_s: float = Field(0.0, description="the training itself (start-up excluded), calibration applied")
    modelled_compute_s: float = Field(
        0.0, description="the time model's training seconds, before calibration or a measured split replaced them"
    )
    evaluation_s: float = Field(0.0, description="the before/after evaluation on the held-out rows")
    optimizer_steps: int = 0
    useful_flops_per_token: float = Field(
        0.0, description="what a real token needs (the model's forward and backward, no padding, no recomputation)"
    )
    peak_flops: float = Field(
        0.0, description="the peak the estimate divides by: every GPU's, or the CPU's measured matmul"
    )
    time_factor: float = Field(1.0, description="measured / modelled time of earlier runs like this one (calibration)")
    calibration: str = Field("", description="which measured runs corrected the estimate, if any")
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
    sha256: str  # of every file the script runs with (`files`), not train.py's alone
    method: Method
    trainer: str
    config: dict[str, Any]
    files: list[str] = Field(default_factory=lambda: ["train.py"])  # in the run folder; train.py first


class InputUpload(Frozen):
    """What a remote backend must upload before its job can start (the job cannot see this disk)."""

    destination: str = Field(description="where the inputs go, e.g. a private Hub repo")
    files: int
    bytes: int
    seconds: float = Field(description="estimated upload time, before the job starts (not billed)")
    items: list[str] = Field(description="what is uploaded: the script, the data, a local model folder")


class JobHandle(Frozen):
    """Enough to find, follow or cancel a job from any process; persisted as runs/<name>/job.json.
    Holds no secret."""

    backend: str
    job_id: str
    run_dir: str
    log_path: str
    started_at: datetime
    pid: int | None = None
    namespace: str | None = None
    endpoint: str | None = None
    url: str | None = None
    flavor: str | None = None
    timeout_s: int | None = None
    staging_repo: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    attempt: int = 1
    flow_run_id: str | None = None
    log_start: int = Field(0, description="lines of log_path written before this job started")


JobStage = Literal["scheduling", "running", "completed", "failed", "cancelled"]


class JobSnapshot(Frozen):
    """A job's state at one poll, with the seconds it has been billed so far."""

    state: JobStage
    billed_s: float
    message: str | None = None


class LossPoint(Frozen):
    step: int
    loss: float


class JobStatus(Frozen):
    state: Literal["completed", "failed", "cancelled"]
    detail: str
    failure: (
        Literal["oom", "killed", "error", "budget", "projection", "stalled", "timeout", "flow cancelled", "lost"] | None
    ) = None
    job_id: str = ""
    backend: str = "local"
    url: str | None = None
    billed_s: float = 0.0
    tokens_per_s: float | None = None
    attempts: list[str] = Field(default_factory=list, description="earlier attempts of this run and how they ended")
    duration_s: float
    steps: int
    max_steps: int | None
    losses: list[LossPoint]
    first_metrics: dict[str, float] = Field(default_factory=dict)
    last_metrics: dict[str, float]
    cost_usd: float


class FileRecord(Frozen):
    """A file a stage wrote: checked (size, then sha256) before anything trusts it again."""

    path: str = Field(description="relative to the folder the record belongs to")
    size: int
    sha256: str


class TrainingMeasurement(Frozen):
    """What the training itself took, measured by the script (start-up and saving excluded)."""

    train_s: float
    optimizer_steps: int
    tokens: int = Field(description="real (non-padding) tokens; 0 where the trainer does not count them")
    peak_memory_gb: float = Field(description="CUDA's peak allocation on a GPU; the process's peak RSS on a CPU")
    device: str
    processes: int = Field(1, description="training processes (the world size); tokens count all of them")
    global_batch: int | None = Field(None, description="rows per optimizer step, all processes together")
    matmul_peak_flops: float | None = Field(
        None,
        description="on a CPU: its float32 matmul FLOP/s with the training's threads (every process's: accelerate "
        "splits the cores among them), measured by the script right after training",
    )

    @property
    def step_s(self) -> float | None:
        return self.train_s / self.optimizer_steps if self.optimizer_steps else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_s if self.tokens and self.train_s > 0 else None


class JobResult(Frozen):
    model_dir: str
    adapter_dir: str | None
    files: list[str]
    size_mb: float
    train_metrics: dict[str, float]
    manifest: list[FileRecord] = Field(default_factory=list, description="model and adapter files, from the run folder")
    measured: TrainingMeasurement | None = None


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
    fallback_tensors: int = Field(0, description="tensors llama.cpp stored in a fallback type")
    total_tensors: int | None = None
    fallbacks: dict[str, int] = Field(default_factory=dict, description='e.g. {"q4_K -> q5_0": 120}')
    thresholds: dict[str, float] = Field(default_factory=dict, description="what the smoke test required")
    # a vision-language model: a held-out image question, answered by llama.cpp with the projector
    image_question: str | None = None
    image: str | None = Field(None, description="the held-out image it was asked about")
    image_answer: str | None = None
    hf_image_answer: str | None = Field(None, description="the transformers model's greedy answer to the same")
    image_answer_agreement: float | None = Field(
        None, description="share of the transformers answer's tokens llama.cpp's greedy answer repeats, in order"
    )
    image_prompt_tokens: int | None = Field(None, description="the question's tokens in llama.cpp, image included")


class GgufFiles(Frozen):
    outcome: StageOutcome
    files: list[GgufFile] = Field(default_factory=list)
    modelfile: str | None = None
    convert_s: float | None = None
    mmproj: GgufFile | None = Field(
        None, description="a vision-language model's projector (llama.cpp's --mmproj), used with every file"
    )

    @property
    def every_file(self) -> list[GgufFile]:
        """The model files and the projector: what is checked, tested and published."""
        return [*self.files, *([self.mmproj] if self.mmproj else [])]


class PublishedModel(Frozen):
    outcome: StageOutcome
    repo: str | None = None
    url: str | None = None
    files: list[FileRecord] = Field(default_factory=list, description="what a folder target holds, as published")


class TrainedModel(Frozen):
    """What the training stage leaves: the job that ran, where it ran, and the model it made.
    Persisted under its training key, so a re-run with the same inputs does not train again."""

    training_key: str
    handle: JobHandle
    job: JobStatus
    result: JobResult
    submitted: str = Field("", description="the first job's URL or id")


class RunPlan(Frozen):
    """Everything decided before money is spent: what --dry-run prints."""

    run_name: str
    run_dir: str
    method: Method
    model: str
    model_path: str
    baseline_path: str | None = Field(None, description="a model the evaluation also compares with (a recipe's base)")
    eval_tasks: list[HarnessTask] = Field(default_factory=list, description="lm-evaluation-harness tasks, both models")
    dataset: DatasetReport
    hardware: HardwarePlan
    cost: CostEstimate
    script: TrainingScript
    inputs: InputUpload | None = None
    notes: list[str] = Field(default_factory=list, description="what the plan assumed and why")
    trackio: dict[str, str] = Field(default_factory=dict, description="Trackio project and run name")


class RunSummary(Frozen):
    """What the flow returns and the report shows."""

    run_name: str
    run_dir: str
    plan: RunPlan
    approval: Approval | None = None
    job: JobStatus | None = None
    result: JobResult | None = None
    evaluation: EvaluationResult | None = None
    gguf: GgufFiles | None = None
    published: PublishedModel | None = None
    stages: list[StageOutcome]
    outputs: dict[str, str]
    error: str | None = None
    error_code: str | None = Field(None, description="the stable code of the failure (docs/errors.md)")
    error_fix: str | None = Field(None, description="what usually helps with that kind of failure")


class RecipeStageResult(Frozen):
    """One stage of a recipe: what it was planned to cost, what it spent, and whether it helped."""

    stage: str
    method: Method
    run_name: str
    started_from: str = Field(description="the model this stage trained from")
    status: Literal["planned", "passed", "failed", "not run"]
    estimated_usd: float
    estimated_usd_high: float
    spent_usd: float = Field(0.0, description="what this stage's job cost now (0 when its training was reused)")
    paid_before: bool = Field(False, description="its training was taken from an earlier run with the same inputs")
    evaluation: EvaluationResult | None = None
    model_dir: str | None = None
    report: str | None = None
    detail: str = ""


class RecipeSummary(Frozen):
    """What the recipe flow returns: the chain, stage by stage, against one budget."""

    recipe_name: str
    run_dir: str
    base_model: str
    max_usd: float
    auto_approve_usd: float
    estimated_usd: float
    estimated_usd_high: float
    spent_usd: float
    stages: list[RecipeStageResult]
    final_model: str | None = None
    published: str | None = None
    error: str | None = None
