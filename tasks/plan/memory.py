"""A first-principles model of a training run's peak memory and FLOPs.

The architecture is read from the model's config and instantiated on PyTorch's meta device,
so parameter counts and layer shapes are exact for any architecture transformers knows
(no name patterns). Memory is the sum of:
- weights: parameters x bytes of the training dtype; QLoRA keeps decoder linear weights in
  4-bit NF4 with double quantization (0.516 bytes per parameter) and the rest in 16 bits;
- trained parameters: LoRA adapters in float32 (PEFT's default), their gradients and
  AdamW's two float32 moments (full fine-tuning: gradients in the training dtype);
- activations per layer and token, counted from the layer's structure (norm inputs, q/k/v,
  attention output, the gated MLP's four intermediate tensors); with gradient
  checkpointing only each layer's input is kept, plus one layer being recomputed; without
  a fused attention kernel (the CPU) the attention probabilities too;
- logits and their gradient in float32 (the loss is computed in float32);
- method extras, from its definition: a pair method's chosen and rejected sequences (DPO,
  ORPO), a reference model (DPO always, GRPO when beta > 0, ORPO never; none with LoRA: the
  adapter is switched off instead), a generating method's KV cache and the share of the GPU
  given to vLLM, and the reward models that score its completions;
- a runtime constant (CUDA context and workspace, or the Python process on a CPU).
The constants marked "calibrated" are fitted by benchmarks/calibrate.py on real runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from tasks.core.derived_cache import config_key, derived
from tasks.core.methods import MethodDefinition, cut_length, method_definition, uses_reference
from tasks.core.model_source import TOWER_MARKERS, auto_model_class, in_tower, load_config
from tasks.core.models import Batching, DatasetReport
from tasks.core.spec import RunSpec
from tasks.plan.flavors import Flavor

GB = 1024**3
NF4_BYTES_PER_PARAM = 0.516  # 4 bits + double-quantized absmax per 64-value block
LOGIT_BYTES_PER_ENTRY = 12  # calibrated: float32 logits, their gradient, the loss's softmax
RUNTIME_GB = {"gpu": 1.0, "cpu": 0.55}  # CUDA context + workspaces; on CPU, calibrated process baseline
ADAM_BYTES = 8


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int
    params: int
    decoder_linear_params: int
    matmul_params: int  # every Linear's in x out, lm_head included even when tied
    lora_params: int
    lora_in_features_per_layer: int  # summed inputs of the adapted linears in one layer
    lora_out_features_per_layer: int  # summed outputs of the adapted linears in one layer
    lora_linears_per_layer: int
    lora_targets: tuple[str, ...] | str = "all-linear"  # what PEFT gets as target_modules
    expert_params: int = 0  # MoE experts' weights (all of them are held; top-k of them compute)
    tower_params: int = 0  # vision/audio towers and projectors of a multimodal model
    tower_matmul_params: int = 0  # their Linears' in x out: a frozen tower's forward FLOPs per patch
    patches_per_image_token: int = 1  # patches the vision tower computes for each token an image becomes
    tower_hidden: int = 0  # the vision tower's width and its MLP's: what one patch holds in one block
    tower_intermediate: int = 0
    tower_layers: int = 0
    tower_modules: tuple[str, ...] = ()  # its outermost modules' names (PEFT's modules_to_save when it trains)
    model_type: str = ""  # the config's, e.g. qwen2: which fused kernels apply
    layer_params: int = 0  # one decoder layer: the unit FSDP gathers at a time
    layer_classes: tuple[str, ...] = ()  # the model's _no_split_modules: what FSDP wraps

    @classmethod
    def from_config(cls, config: Any, lora_r: int = 16, target_modules: list[str] | str = "auto") -> Architecture:
        """Measured on the meta device once per config (tasks/core/derived_cache.py), then read."""
        key = {"config": config_key(config), "lora_r": lora_r, "targets": target_modules}
        found = derived("architecture", key, lambda: dataclasses.asdict(cls.measured(config, lora_r, target_modules)))
        tuples = {k: tuple(v) for k, v in found.items() if isinstance(v, list)}  # JSON gave lists back
        return cls(**{**found, **tuples})

    @classmethod
    def measured(cls, config: Any, lora_r: int = 16, target_modules: list[str] | str = "auto") -> Architecture:
        import torch

        with torch.device("meta"):
            model = auto_model_class(config).from_config(config)
        output = model.get_output_embeddings()
        params = sum(p.numel() for p in model.parameters())
        text = getattr(config, "text_config", None) or config
        experts = int(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0)
        top_k = int(getattr(text, "num_experts_per_tok", None) or 0)
        targets = resolve_lora_targets(model, target_modules)
        decoder_linear = matmul = lora = lora_inputs = lora_outputs = lora_count = expert = tower = layered = 0
        for name, p in model.named_parameters():
            if re.search(r"\.layers\.\d+\.", name) and not in_tower(name):
                layered += p.numel()
            if in_tower(name):
                tower += p.numel()
            elif p.dim() == 3 and ".experts." in name and experts:
                # fused MoE experts (transformers 5): every expert is held, top-k compute per token
                expert += p.numel()
                matmul += p.numel() * top_k // experts
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or in_tower(name):
                continue
            size = module.in_features * module.out_features
            matmul += size
            if module is output:
                continue
            decoder_linear += size
            if _lora_targets_module(name, targets):
                lora += lora_r * (module.in_features + module.out_features)
                lora_inputs += module.in_features
                lora_outputs += module.out_features
                lora_count += 1
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        return cls(
            hidden=int(text.hidden_size),
            layers=int(text.num_hidden_layers),
            heads=heads,
            kv_dim=kv_heads * head_dim,
            intermediate=_active_intermediate(text, top_k),
            vocab=int(text.vocab_size),
            params=params,
            decoder_linear_params=decoder_linear,
            matmul_params=matmul,
            lora_params=lora,
            lora_in_features_per_layer=lora_inputs // max(int(text.num_hidden_layers), 1),
            lora_out_features_per_layer=lora_outputs // max(int(text.num_hidden_layers), 1),
            lora_linears_per_layer=lora_count // max(int(text.num_hidden_layers), 1),
            lora_targets=targets,
            expert_params=expert,
            tower_params=tower,
            **_tower(model, config),
            model_type=str(getattr(config, "model_type", "")),
            layer_params=layered // max(int(text.num_hidden_layers), 1),
            layer_classes=tuple(getattr(model, "_no_split_modules", None) or ()),
        )


ROUTER_LEAVES = ("gate", "router")  # MoE routers: a LoRA there would change which experts are chosen


def _active_intermediate(text: Any, top_k: int) -> int:
    """The MLP width a token passes through: top-k experts' widths for MoE models."""
    if top_k:
        width = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", None)
        return int(width) * top_k + int(getattr(text, "shared_expert_intermediate_size", 0) or 0)
    return int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size)


def _tower(model: Any, config: Any) -> dict[str, int]:
    """A multimodal model's vision tower as the FLOP and memory models need it."""
    import torch

    vision = getattr(config, "vision_config", None)
    hidden = int(getattr(vision, "hidden_size", None) or getattr(vision, "embed_dim", None) or 0)
    names = [name for name, _ in model.named_modules()]
    matmul = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and in_tower(name)
    )
    outermost = {
        n.rsplit(".", 1)[-1] for n in names if in_tower(n) and not in_tower(n.rsplit(".", 1)[0] if "." in n else "")
    }
    return {
        "tower_matmul_params": matmul,
        "patches_per_image_token": patches_per_image_token(config),
        "tower_hidden": hidden,
        "tower_intermediate": int(getattr(vision, "intermediate_size", 0) or 4 * hidden),
        "tower_layers": int(getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None) or 0),
        "tower_modules": tuple(sorted(outermost)),
    }


def patches_per_image_token(config: Any) -> int:
    """How many of the vision tower's patches make one image token: Qwen2-VL merges 2x2
    (`spatial_merge_size`), Idefics3/SmolVLM shuffles pixels by `scale_factor` squared, Gemma 3
    pools its patch grid to `mm_tokens_per_image`; 1 for a text model."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 1
    if getattr(vision, "spatial_merge_size", None):
        return int(vision.spatial_merge_size) ** 2
    if getattr(config, "scale_factor", None):
        return int(config.scale_factor) ** 2
    if getattr(config, "mm_tokens_per_image", None) and getattr(vision, "image_size", None):
        grid = (int(vision.image_size) // int(vision.patch_size)) ** 2
        return max(1, grid // int(config.mm_tokens_per_image))
    return 1


def resolve_lora_targets(model: Any, requested: list[str] | str) -> tuple[str, ...] | str:
    """`auto`: every linear layer of the language model by its leaf name, except MoE routers
    (and fused experts, which are not linears) and the towers of a multimodal model, which
    stay frozen; as a regex over the language model when towers share those leaf names."""
    import torch

    if requested != "auto":
        return requested if isinstance(requested, str) else tuple(requested)
    output = model.get_output_embeddings()
    leaves: set[str] = set()
    towers = False
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if in_tower(name):
            towers = True
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ROUTER_LEAVES:
            leaves.add(leaf)
    names = tuple(sorted(leaves))
    if towers:
        return rf"^(?!.*({'|'.join(TOWER_MARKERS)})).*\.({'|'.join(names)})$"
    return names


def _lora_targets_module(name: str, targets: tuple[str, ...] | str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return leaf in targets


Mode = Literal["full", "lora", "qlora"]
Strategy = Literal["single", "ddp", "fsdp"]
COMM_BUFFERS_GB = 0.5  # assumed: NCCL's communication buffers per GPU process (gloo's on a CPU are small)
# What FSDP's CPU offload moves to the host: the parameters' shards and with them their gradients
# and optimizer state (the optimizer step runs on the CPU). FSDP has no optimizer-only offload
# (that is DeepSpeed ZeRO-Offload's, not used here).
OFFLOADED = ("weights", "adapter", "gradients", "optimizer", "optimizer step")
# assumed: one training process's host memory besides offloaded state (the CUDA context's host
# side, Python and the libraries, pinned transfer buffers, one shard of the checkpoint loading)
HOST_PROCESS_GB = 8.0


class Placement(NamedTuple):
    """How a flavor runs the training: one process, or several launched together on one node or
    on `nodes` machines alike, data parallel or sharded, the shards in GPU or host memory."""

    strategy: Strategy = "single"
    processes: int = 1  # every node's together: one per GPU
    nodes: int = 1
    offload: bool = False  # FSDP's CPU offload (strategy fsdp only)

    @property
    def per_node(self) -> int:
        return self.processes // self.nodes


ONE_PROCESS = Placement()


class Workload(BaseModel):
    """The shape of one optimizer micro-step, as far as memory and FLOPs are concerned."""

    model_config = ConfigDict(frozen=True)

    mode: Mode = "full"
    dtype_bytes: int = 2
    micro_batch: int = 1
    seq_len: int = 1024
    # the longest span attention covers, when shorter than seq_len: a padding-free batch is one
    # sequence of its rows end to end, and each row attends over itself only
    attention_len: int = 0
    checkpointing: bool = False
    fused_attention: bool = True
    lora_dropout: bool = True  # PEFT keeps a dropped-out copy of each adapted layer's input
    strategy: Strategy = "single"
    processes: int = 1  # training processes, every node's (one per GPU; on a CPU they share the machine)
    nodes: int = 1  # machines alike, each running processes / nodes of them
    offload: bool = False  # fsdp: parameter shards, gradients and optimizer state in host memory
    # what the method puts through the model (its MethodDefinition; `Workload.of`)
    sequences_per_row: int = 1  # pairs: chosen and rejected
    sequences_with_grad: int = 0  # of those, the ones whose activations are kept (0: all)
    reference_model: bool = False  # a frozen reference forward per sequence
    generates: bool = False
    lm_logits: bool = True  # a vocabulary of logits per token; a classifier (reward model) has one score
    image_token_share: float = 0.0  # of the tokens, those images become (a vision-language model's rows)
    tower_trained: bool = False  # the spec's vision_tower: trained (frozen otherwise)
    # reward models scoring the completions, held beside the policy for forwards only: each one's
    # parameters, or None for one a recipe stage has yet to train (planned at the policy's size)
    reward_models: tuple[int | None, ...] = ()
    # generating methods only
    num_generations: int = 8
    completion_len: int = 256
    vllm_gpu_fraction: float = 0.0

    @classmethod
    def of(cls, method: MethodDefinition, args: dict[str, Any] | None = None, **shape: Any) -> Workload:
        """The workload of `method` with its training arguments (the reference model may hang on `beta`)."""
        traits = {
            "sequences_per_row": method.sequences_per_row,
            "sequences_with_grad": method.sequences_with_grad,
            "reference_model": uses_reference(method, args or {}),
            "generates": method.generates,
            "lm_logits": method.head == "causal_lm",
        }
        return cls(**traits, **shape)


def _sequences(w: Workload) -> int:
    """Sequences in one micro-step whose activations wait for the backward (a sequence scored
    under no_grad frees them as it goes)."""
    return (w.sequences_with_grad or w.sequences_per_row) * w.micro_batch


def trained_parameters(arch: Architecture, mode: Mode, tower_trained: bool = False) -> int:
    """What the optimizer updates: every weight but the towers (full), the adapter (LoRA), and
    the towers too when the spec trains them."""
    base = arch.params - arch.tower_params if mode == "full" else arch.lora_params
    return base + (arch.tower_params if tower_trained else 0)


def lora_rank(arch: Architecture) -> int:
    per_linear = arch.lora_in_features_per_layer + arch.lora_out_features_per_layer
    return round(arch.lora_params / max(per_linear * arch.layers, 1))


def memory_breakdown_gb(
    arch: Architecture, w: Workload, device: Literal["gpu", "cpu"], device_gb: float = 0
) -> dict[str, float]:
    b = w.dtype_bytes
    if w.mode == "qlora":
        weights = arch.decoder_linear_params * NF4_BYTES_PER_PARAM + (arch.params - arch.decoder_linear_params) * b
    else:
        weights = arch.params * b
    trained = trained_parameters(arch, w.mode, w.tower_trained)
    adapter = 0 if w.mode == "full" else arch.lora_params * 4
    gradients = trained * (b if w.mode == "full" else 4)
    optimizer = trained * ADAM_BYTES

    seqs = _sequences(w)
    tokens = seqs * w.seq_len
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_dim
    per_token_layer = (5 * h + 2 * kv + 4 * i) * b  # attention block 4h+2kv(+out h), gated MLP 2h+4i
    if w.mode != "full":
        # per adapted linear PEFT keeps: the dropped-out input copy (when dropout > 0), the
        # rank-r down-projection, the scaled up-projection and the sum with the base output
        adapter_bytes = 4 if w.mode == "lora" and b == 4 else 2
        values = 2 * arch.lora_out_features_per_layer + lora_rank(arch) * arch.lora_linears_per_layer
        if w.lora_dropout:
            values += arch.lora_in_features_per_layer
        per_token_layer += values * adapter_bytes
    # without a fused kernel, attention keeps its scores and probabilities (2 x heads x s^2)
    attention_probs = 0 if w.fused_attention else 2 * seqs * arch.heads * (w.attention_len or w.seq_len) ** 2 * b
    per_layer = tokens * per_token_layer + attention_probs
    if w.checkpointing:
        activations = tokens * h * b * arch.layers + per_layer
    else:
        activations = per_layer * arch.layers
    logits = (tokens * arch.vocab if w.lm_logits else seqs) * LOGIT_BYTES_PER_ENTRY

    out = {
        "weights": weights / GB,
        "adapter": adapter / GB,
        "gradients": gradients / GB,
        "optimizer": optimizer / GB,
        "optimizer step": trained * 4 / GB,  # AdamW's multi-tensor update keeps one float32 temporary
        "activations": activations / GB,
        "logits": logits / GB,
    }
    out.update(_tower_activations(arch, w, tokens))
    if w.reference_model and w.mode == "full":  # with LoRA, the base with the adapter switched off
        out["reference model"] = arch.params * b / GB
    if w.reward_models:
        out["reward models"] = sum(p or arch.params for p in w.reward_models) * b / GB
    if w.generates:
        kv_cache = w.micro_batch * w.seq_len * arch.layers * 2 * kv * b
        out["generation kv cache"] = kv_cache / GB
        if w.vllm_gpu_fraction and device == "gpu":
            out["vllm"] = w.vllm_gpu_fraction * device_gb
    out["runtime"] = RUNTIME_GB[device]
    if w.processes > 1:
        out = _per_process(out, arch, w, device, trained * (b if w.mode == "full" else 4))
    return {k: round(v, 4) for k, v in out.items() if v}


def _tower_activations(arch: Architecture, w: Workload, tokens: int) -> dict[str, float]:
    """A frozen tower keeps no activations: one block's working set over the micro-batch's
    patches; a trained one keeps every block's for its backward pass."""
    if not (w.image_token_share and arch.tower_hidden):
        return {}
    patches = tokens * w.image_token_share * arch.patches_per_image_token
    per_block = patches * (6 * arch.tower_hidden + 3 * arch.tower_intermediate) * w.dtype_bytes
    if w.tower_trained:
        return {"vision tower activations": per_block * max(arch.tower_layers, 1) / GB}
    return {"vision tower (forward)": per_block / GB}


def _per_process(
    out: dict[str, float], arch: Architecture, w: Workload, device: str, gradient_bytes: float
) -> dict[str, float]:
    """What one of several training processes holds. Data parallel (ddp): the whole model state,
    plus DDP's bucketed copy of the gradients it all-reduces. Sharded (fsdp full shard):
    parameters, gradients and optimizer state divided by the process count, plus the all-gather
    working set: the decoder layer computing, the next one prefetched, the root unit (embeddings,
    final norm, head) that stays gathered through forward and backward, and a layer's full
    gradient before its reduce-scatter. Activations and logits are each process's own micro-batch.
    On a CPU a node's processes share its memory, so the machine holds all of them."""
    n = w.processes
    out = dict(out)
    if w.strategy == "fsdp":
        for key in ("weights", "adapter", "gradients", "optimizer", "optimizer step", "reference model"):
            if key in out:
                out[key] /= n
        if w.offload:  # host_memory_gb holds them
            out = {k: v for k, v in out.items() if k not in OFFLOADED}
        unit = arch.layer_params
        root = max(arch.params - arch.layers * unit - arch.tower_params, 0)
        gathered = (2 * unit + root) * w.dtype_bytes + (unit * w.dtype_bytes if w.mode == "full" else 0)
        out["fsdp all-gather"] = gathered / GB
    else:
        out["ddp gradient buckets"] = gradient_bytes / GB
    if device == "gpu":
        out["communication"] = COMM_BUFFERS_GB
        return out
    return {k: v * (n // w.nodes) for k, v in out.items()}


def host_memory_gb(arch: Architecture, w: Workload) -> dict[str, float]:
    """What one node's host memory holds for an offloaded run: every process's offloaded shards
    (parameters, gradients, optimizer state) and each process's own. Empty without offload."""
    if not w.offload:
        return {}
    on_device = memory_breakdown_gb(arch, w.model_copy(update={"offload": False}), "gpu")
    shards = sum(v for k, v in on_device.items() if k in OFFLOADED)
    per_node = w.processes // w.nodes
    return {"offloaded model state": round(shards * per_node, 4), "training processes": HOST_PROCESS_GB * per_node}


def flops_per_token(arch: Architecture, w: Workload) -> float:
    """Training FLOPs per processed token: the forward (2 per matmul parameter plus
    attention), the backward (twice the forward, or once without weight gradients when only
    an adapter trains), and a second forward under gradient checkpointing."""
    forward = 2 * arch.matmul_params + 2 * arch.layers * (w.attention_len or w.seq_len) * arch.hidden
    backward = 2 * forward if w.mode == "full" else forward
    recompute = forward if w.checkpointing else 0
    total = forward + backward + recompute
    # the vision tower over the patches behind each image token: a forward when frozen, and its backward when trained
    tower_passes = 3 if w.tower_trained else 1
    total += w.image_token_share * arch.patches_per_image_token * 2 * arch.tower_matmul_params * tower_passes
    if w.reference_model:
        total += forward
    total += sum(
        2 * (p or arch.matmul_params) for p in w.reward_models
    )  # each reward model scores every sequence  # the reference forward (with LoRA: the same model, adapter switched off)
    return float(total)


def reward_model_sizes(rewards: list[str]) -> tuple[int | None, ...]:
    """The parameters of each reward model among a spec's rewards, read from its config (the
    reward functions are not models and take no memory); None for a recipe stage's run folder
    that is not trained yet."""
    from tasks.plan.rewards import RewardError, reward_model_source

    sizes: list[int | None] = []
    for name in rewards:
        try:
            source = reward_model_source(name)
        except RewardError:  # a folder without a model yet: `stage:<name>` of a recipe, planned
            source = None  # before its stage trains (anything else the reward check has refused)
        if source is not None:
            sizes.append(Architecture.from_config(load_config(source)).params)
        elif ":" not in name and Path(name).is_absolute():
            sizes.append(None)
    return tuple(sizes)


def largest_padding_free_batch(report: DatasetReport, micro: int, cut: int) -> int:
    """The longest sequence `micro` rows cut at `cut` make over an epoch, which sets the peak: the
    sum of `micro` random rows (their cut lengths' mean and spread, from the percentiles) at the
    largest of the epoch's draws, sqrt(2 ln n) standard deviations above its mean (the normal
    extreme; a little above the median largest sum simulated on skewed lengths, 4,096 against
    3,857 tokens for 4 of log-uniform rows cut at 1,024), and never more than `micro` rows at the cut."""
    lengths = [min(p, cut) for p in report.length_percentiles] or [min(report.tokens.mean, cut)]
    mean = sum(lengths) / len(lengths)
    spread = math.sqrt(sum((x - mean) ** 2 for x in lengths) / len(lengths))
    draws = max(2, report.rows // micro)
    return min(micro * cut, round(micro * mean + spread * math.sqrt(micro * 2 * math.log(draws))))


def workload_for(
    spec: RunSpec,
    flavor: Flavor,
    mode: Mode,
    args: dict[str, Any],
    report: DatasetReport,
    placement: Placement = ONE_PROCESS,
    batching: Batching = "padded",
) -> Workload:
    """What one micro-step puts through the model, from the training arguments and the batching
    the speed plan chose (a padding-free micro-batch is one sequence of its rows)."""
    on_gpu = flavor.is_gpu
    seq_len = min(cut_length(args, report.max_length), report.tokens.max)
    method = method_definition(spec.method)
    extra: dict[str, Any] = {}
    if method.generates:
        completion = int(args.get("max_completion_length", 256))
        seq_len = min(report.tokens.max, cut_length(args, report.max_length)) + completion
        extra = {
            "num_generations": int(args.get("num_generations", 8)),
            "completion_len": completion,
            "vllm_gpu_fraction": float(args.get("vllm_gpu_memory_utilization", 0.3)) if args.get("use_vllm") else 0.0,
        }
    if method.rewards:
        extra["reward_models"] = reward_model_sizes(spec.rewards)
    extra["tower_trained"] = spec.vision_tower == "trained"
    if report.images is not None and report.total_tokens:
        extra["image_token_share"] = min(1.0, report.images.image_tokens / report.total_tokens)
    micro = int(args.get("per_device_train_batch_size", 1))
    if batching == "padding_free" and not method.generates and micro > 1:  # one sequence of its rows
        extra["attention_len"] = max(seq_len, 1)
        seq_len, micro = largest_padding_free_batch(report, micro, seq_len), 1
    return Workload.of(
        method,
        args,
        mode=mode,
        dtype_bytes=2 if (on_gpu and flavor.bf16) else 4,
        micro_batch=micro,
        seq_len=max(seq_len, 1),
        checkpointing=bool(args.get("gradient_checkpointing", on_gpu)),
        fused_attention=on_gpu,
        lora_dropout=spec.lora.dropout > 0,
        strategy=placement.strategy if placement.processes > 1 else "single",
        processes=placement.processes,
        nodes=placement.nodes,
        offload=placement.offload,
        **extra,
    )
