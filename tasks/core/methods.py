"""What differs between training methods, in one place per method.

The lifecycle is shared; a method is one `MethodDefinition`: the TRL trainer and config class
its script uses, what a row of its data is, what it puts through the model (the memory and
time model read these), how its evaluation scores a held-out row, and what it exports. The
stages read these fields; none of them asks which method it is. Adding a method is adding a
definition here (and, for a new kind of data, its reader and schema in `tasks.data`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.spec import Method, RunSpec, SpecError

# what a row is: a conversation or text to imitate; a prompt with a chosen and a rejected
# answer; a prompt with one answer labelled desirable or not; a prompt to answer and be rewarded
DataKind = Literal["demonstrations", "pairs", "unpaired", "prompts"]
# how the evaluation scores each held-out row, oriented so that higher is better (tasks.evaluate.verdict)
Measure = Literal["completion_loss", "preference_margin", "label_likelihood", "rewards", "pair_accuracy"]


class MethodDefinition(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: Method
    title: str  # the flow's description
    trainer: str
    config_class: str
    trainer_module: str = "trl"  # where both classes live (ORPO: trl.experimental.orpo)
    template: str = "train.py"
    data: DataKind
    # dataset formats in detection order: format name -> canonical columns it needs
    formats: dict[str, tuple[str, ...]]
    # defaults chosen for correctness on any hardware; the spec's `training` overrides them
    training_defaults: dict[str, Any]
    # keep dataset columns beyond the format's own (reward functions read them)
    keep_extra_columns: bool = False
    # the Trackio metrics that show whether the method did what it claims
    # (the loss is always reported; these come beside it)
    signal_metrics: tuple[str, ...] = ("train/mean_token_accuracy",)
    # --- what one training step puts through the model (tasks.plan.memory and cost) ---
    sequences_per_row: int = 1  # pairs: the chosen and the rejected answer, each a forward and backward
    # of those, the ones whose activations are kept for a backward (0: all): KTO scores its KL
    # batch under no_grad, so it costs compute and no activations
    sequences_with_grad: int = 0
    # a frozen reference model beside the trained one: always (DPO), never (ORPO: its odds ratio
    # needs none), or when `beta` > 0 (GRPO); with LoRA it is the base with the adapter off
    reference: Literal["always", "never", "beta"] = "never"
    generates: bool = False  # samples completions while training (GRPO)
    rewards: bool = False  # the spec's `rewards:` apply
    # on a CPU the time model picks the micro-batch among the splits of the global batch
    # (SFT); the other trainers pad their batches their own way (`batching` says how)
    cpu_split_search: bool = False
    batching: str = ""
    min_micro_batch: int = 1  # the smallest per-device batch the trainer accepts (KTO: 2)
    # --- the model it makes, and what is exported ---
    # a causal LM, or a sequence classifier with one score per sequence (a reward model)
    head: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    no_gguf: str = ""  # why GGUF files are not made ("" = they are)
    # --- evaluation ---
    measure: Measure
    check_by_hand: str  # the model card's sentence on how to recompute a held-out score
    # why no format fits, for `flows.inspect` and every refusal of a dataset
    incompatible: str


_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 1024,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
}

PAIR_FORMATS = {
    "preference": ("prompt", "chosen", "rejected"),
    # conversations that carry their prompt as a shared prefix of chosen and rejected
    "implicit_preference": ("chosen", "rejected"),
}
MARGIN_BY_HAND = (
    "`evaluation.json` holds every held-out pair's margin for both models: the summed log-probability of the "
    "chosen answer minus that of the rejected one, each after the prompt rendered through the chat template."
)

SFT = MethodDefinition(
    name="sft",
    title="Supervised fine-tuning, through every lifecycle stage.",
    trainer="SFTTrainer",
    config_class="SFTConfig",
    data="demonstrations",
    formats={  # in the order they are tried: conversations with images before those without
        "vision": ("messages", "images"),
        "messages": ("messages",),
        "prompt_completion": ("prompt", "completion"),
        "text": ("text",),
    },
    # counts real (non-padding) tokens, so the progress lines can report tokens/s
    training_defaults={**_COMMON_DEFAULTS, "include_num_input_tokens_seen": "non_padding"},
    cpu_split_search=True,
    measure="completion_loss",
    check_by_hand="`evaluation.json` holds every held-out row's score for both models. To check one by hand: "
    "render the row's conversation without its last turn through this model's chat template with the generation "
    "prompt, then the whole conversation; the score is the mean negative log-likelihood per token of what the "
    "second adds (the answer), under each model, in float32.",
    incompatible="no conversation, prompt/response pair or text column",
)

DPO = MethodDefinition(
    name="dpo",
    title="Direct preference optimisation, through the same lifecycle as SFT.",
    trainer="DPOTrainer",
    config_class="DPOConfig",
    data="pairs",
    # pairs whose prompt shows images first: TRL's DPOTrainer takes them with a processor
    formats={"vision_preference": ("prompt", "chosen", "rejected", "images"), **PAIR_FORMATS},
    training_defaults={**_COMMON_DEFAULTS, "learning_rate": 1e-5, "beta": 0.1, "loss_type": ["sigmoid"]},
    signal_metrics=("train/rewards/margins", "train/rewards/accuracies"),
    sequences_per_row=2,
    reference="always",
    batching="TRL's DPOTrainer pads its pairs (its padding_free is unavailable in TRL 1.16)",
    measure="preference_margin",
    check_by_hand=MARGIN_BY_HAND,
    incompatible="no pairs of a chosen and a rejected answer (DPO learns from pairs)",
)

ORPO = MethodDefinition(
    name="orpo",
    title="Odds-ratio preference optimisation: SFT and preference in one loss, no reference model.",
    trainer="ORPOTrainer",
    config_class="ORPOConfig",
    trainer_module="trl.experimental.orpo",
    data="pairs",
    formats=PAIR_FORMATS,
    # ORPO's paper trains at SFT-like rates (8e-6 on 7B); its loss includes the chosen answer's NLL
    training_defaults={**_COMMON_DEFAULTS, "learning_rate": 8e-6, "beta": 0.1},
    signal_metrics=("train/rewards/margins", "train/rewards/accuracies", "train/nll_loss"),
    sequences_per_row=2,
    reference="never",
    batching="TRL's ORPOTrainer pads its pairs",
    measure="preference_margin",
    check_by_hand=MARGIN_BY_HAND,
    incompatible="no pairs of a chosen and a rejected answer (ORPO learns from pairs)",
)

KTO = MethodDefinition(
    name="kto",
    title="Kahneman-Tversky optimisation: single answers labelled desirable or not, no pairs needed.",
    trainer="KTOTrainer",
    config_class="KTOConfig",
    data="unpaired",
    formats={"unpaired": ("prompt", "completion", "label")},
    training_defaults={**_COMMON_DEFAULTS, "learning_rate": 5e-6, "beta": 0.1},
    signal_metrics=("train/rewards/margins", "train/kl"),
    # each step also scores a KL batch (the same completions under mismatched prompts), policy
    # and reference alike; the reference is the base with the adapter off under LoRA, as DPO's
    sequences_per_row=2,
    sequences_with_grad=1,  # the KL batch is scored under torch.no_grad (KTOTrainer._compute_kl_logps)
    reference="always",
    batching="TRL's KTOTrainer pads its rows and builds a KL batch of mismatched prompt/completion pairs",
    # its KL term is estimated from the other rows of a micro-batch: with one row it is the
    # implied reward itself, and TRL refuses it
    min_micro_batch=2,
    measure="label_likelihood",
    check_by_hand="`evaluation.json` holds every held-out row's summed log-probability of its answer after the "
    "prompt (rendered through the chat template), with its label, for both models; the score is that "
    "log-probability for a desirable answer and minus it for an undesirable one.",
    incompatible="no single answers labelled desirable or not (KTO learns from prompt, completion, label)",
)

GRPO = MethodDefinition(
    name="grpo",
    title="Group relative policy optimisation with verifiable rewards, through the same lifecycle.",
    trainer="GRPOTrainer",
    config_class="GRPOConfig",
    data="prompts",
    # prompts only; every other column (answer, tests, ...) is kept for the reward functions
    formats={"prompt_only": ("prompt",)},
    keep_extra_columns=True,
    training_defaults={
        **{k: v for k, v in _COMMON_DEFAULTS.items() if k != "max_length"},  # GRPOConfig has no max_length
        "learning_rate": 1e-5,
        "num_generations": 8,
        "max_completion_length": 256,
        "beta": 0.0,
        "temperature": 1.0,
        "use_vllm": False,
    },
    signal_metrics=("train/reward",),
    reference="beta",
    generates=True,
    rewards=True,
    batching="GRPO batches prompts and pads the completions it generates",
    measure="rewards",
    check_by_hand="`evaluation.json` holds every held-out prompt's rewards for both models: each reward function "
    "applied to a greedy completion (and to a sampled one) of at most max_completion_length tokens.",
    incompatible="no prompt column (GRPO generates from prompts)",
)

REWARD = MethodDefinition(
    name="reward",
    title="A reward model from preference pairs: a sequence classifier that scores an answer to a prompt.",
    trainer="RewardTrainer",
    config_class="RewardConfig",
    data="pairs",
    formats=PAIR_FORMATS,
    training_defaults={**_COMMON_DEFAULTS, "learning_rate": 1e-4},
    signal_metrics=("train/accuracy", "train/margin"),
    sequences_per_row=2,
    reference="never",
    batching="TRL's RewardTrainer pads its pairs",
    head="sequence_classification",
    no_gguf="a reward model is a sequence classifier (one score per sequence), not a chat model: llama.cpp's "
    "converter writes causal language models, and nothing would chat with it; load it with transformers",
    measure="pair_accuracy",
    check_by_hand="`evaluation.json` holds every held-out pair's scores under both models: the model's single "
    "output for the prompt and chosen answer rendered through the chat template, and for the prompt and rejected "
    "answer; a pair counts as right when the chosen answer scores higher.",
    incompatible="no pairs of a chosen and a rejected answer (a reward model learns from pairs)",
)

# RLOO reads GRPO's data and rewards and generates as GRPO does; what differs is its advantage
# (each completion's reward against the mean of the others for the same prompt, no std scaling)
# and TRL's defaults: a KL penalty (beta 0.05, so a reference model) and 2 generations per prompt
RLOO = GRPO.model_copy(
    update={
        "name": "rloo",
        "title": "REINFORCE leave-one-out with verifiable rewards, through the same lifecycle.",
        "trainer": "RLOOTrainer",
        "config_class": "RLOOConfig",
        "training_defaults": {**GRPO.training_defaults, "num_generations": 4, "beta": 0.05},
        "batching": "RLOO batches prompts and pads the completions it generates",
        "incompatible": "no prompt column (RLOO generates from prompts)",
    }
)

METHODS: dict[str, MethodDefinition] = {m.name: m for m in (SFT, DPO, ORPO, KTO, REWARD, GRPO, RLOO)}


def uses_reference(method: MethodDefinition, args: dict[str, Any]) -> bool:
    """Whether a frozen reference model is computed beside the trained one."""
    return method.reference == "always" or (method.reference == "beta" and float(args.get("beta", 0.0)) > 0)


def method_definition(method: str) -> MethodDefinition:
    try:
        return METHODS[method]
    except KeyError:
        raise NotImplementedError(f"method '{method}' has no pipeline yet; available: {', '.join(METHODS)}") from None


def cut_length(args: dict[str, Any], unset: int) -> int:
    """Where rows are cut: max_length (1024 when not given, TRL's default), or `unset` when it is
    None (padding-free rows are kept whole: the model's context length, or the longest row)."""
    value = args.get("max_length", 1024)
    return unset if value is None else int(value)


def base_arguments(method: MethodDefinition, overrides: dict[str, Any]) -> dict[str, Any]:
    """Method defaults, then the spec's `training`; device-dependent keys come later."""
    return {**method.training_defaults, **overrides}


def unknown_training_keys(method: MethodDefinition, keys: list[str]) -> dict[str, list[str]]:
    """Keys the method's TRL config does not accept, each with close matches."""
    import difflib

    valid = config_fields(method.config_class, method.trainer_module)
    return {k: difflib.get_close_matches(k, valid, n=3) for k in keys if k not in valid}


def config_fields(config_class: str, module: str = "trl") -> list[str]:
    """The field names of a TRL config class. Importing TRL's configs takes 6-7 s of CPU (they
    import transformers' trainer, which imports peft), and a dry run, `flows.inspect` or an
    agent's plan needs only the names: they are kept in the cache folder per installed trl and
    transformers version, so another version is read afresh."""
    import dataclasses
    import json
    from importlib.metadata import version

    from tasks.core.atomic import write_text
    from training.tiny_model import cache_root

    path = cache_root() / "trl-config-fields" / f"trl-{version('trl')}-transformers-{version('transformers')}.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if config_class not in known:
        import importlib
        import warnings

        with warnings.catch_warnings():  # trl.experimental says it is experimental; the plan names the module
            warnings.simplefilter("ignore")
            found = getattr(importlib.import_module(module), config_class)
        known[config_class] = sorted(f.name for f in dataclasses.fields(found))
        write_text(path, json.dumps(known, indent=1))  # atomic: a concurrent reader sees old or new
    return known[config_class]


def outputs_for_method(spec: RunSpec) -> RunSpec:
    """The spec with only the outputs its method makes: GGUF files asked for by default are
    dropped for a method that makes none (a reward model); asked for in the spec, they are
    refused with the reason, rather than silently not made."""
    method = method_definition(spec.method)
    if not method.no_gguf or not spec.outputs.gguf:
        return spec
    if "gguf" in spec.outputs.model_fields_set:
        raise SpecError(f"outputs.gguf: {method.name} makes no GGUF files: {method.no_gguf}. Remove outputs.gguf")
    return spec.model_copy(update={"outputs": spec.outputs.model_copy(update={"gguf": []})})


SECRET_LIKE = ("password", "secret", "api_key")
SECRET_FIELDS = ("hub_token", "push_to_hub_token")  # the trainer configs' own options that hold one


def _looks_secret(key: str, unknown: dict[str, Any]) -> bool:
    """A password, secret or API key anywhere in the name; a token where the name is a trainer's
    token option or no option at all (`hf_token`), not where it names a tokenizer's token
    (`pad_token`) or counts tokens (`include_num_input_tokens_seen`)."""
    name = key.lower()
    if name in SECRET_FIELDS or any(s in name for s in SECRET_LIKE):
        return True
    return "token" in name.split("_") and key in unknown


def check_training_keys(spec: RunSpec) -> None:
    """Refuse a secret-looking or unknown `training` key, or `rewards` for a method without
    them, before anything is written."""
    method = method_definition(spec.method)
    if spec.rewards and not method.rewards:
        with_rewards = " and ".join(m.name for m in METHODS.values() if m.rewards)
        raise SpecError(f"'rewards' applies to {with_rewards} only (this spec's method is {spec.method})")
    unknown = unknown_training_keys(method, list(spec.training))
    secrets = [k for k in spec.training if _looks_secret(k, unknown)]
    if secrets:
        raise SpecError(
            f"training.{secrets[0]} looks like a secret; secrets never go into the spec or the script. "
            "Set HF_TOKEN in the environment (or a Prefect Secret block) instead."
        )
    if unknown:
        parts = [
            f"'{k}'" + (f" (did you mean {', '.join(repr(m) for m in near)}?)" if near else "")
            for k, near in unknown.items()
        ]
        raise SpecError(f"training: unknown {method.config_class} option(s): {', '.join(parts)}")
