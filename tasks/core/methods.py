"""What differs between training methods, in one place per method.

The pipeline is shared; a method contributes its dataset formats, the TRL trainer and
config class its script uses, the script template, and training defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from tasks.core.spec import Method, RunSpec, SpecError

if TYPE_CHECKING:
    pass


class MethodDefinition(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: Method
    trainer: str
    config_class: str
    template: str
    # dataset formats in detection order: format name -> canonical columns it needs
    formats: dict[str, tuple[str, ...]]
    # defaults chosen for correctness on any hardware; the spec's `training` overrides them
    training_defaults: dict[str, Any]
    # keep dataset columns beyond the format's own (GRPO rewards read them)
    keep_extra_columns: bool = False
    # the Trackio metrics that show whether the method did what it claims
    # (the loss is always reported; these come beside it)
    signal_metrics: tuple[str, ...] = ("train/mean_token_accuracy",)


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

SFT = MethodDefinition(
    name="sft",
    trainer="SFTTrainer",
    config_class="SFTConfig",
    template="train.py",
    formats={
        "messages": ("messages",),
        "prompt_completion": ("prompt", "completion"),
        "text": ("text",),
    },
    # counts real (non-padding) tokens, so the progress lines can report tokens/s
    training_defaults={**_COMMON_DEFAULTS, "include_num_input_tokens_seen": "non_padding"},
)

DPO = MethodDefinition(
    name="dpo",
    trainer="DPOTrainer",
    config_class="DPOConfig",
    template="train.py",
    formats={
        "preference": ("prompt", "chosen", "rejected"),
        # conversations that carry their prompt as a shared prefix of chosen and rejected
        "implicit_preference": ("chosen", "rejected"),
    },
    training_defaults={**_COMMON_DEFAULTS, "learning_rate": 1e-5, "beta": 0.1, "loss_type": ["sigmoid"]},
    signal_metrics=("train/rewards/margins", "train/rewards/accuracies"),
)

GRPO = MethodDefinition(
    name="grpo",
    trainer="GRPOTrainer",
    config_class="GRPOConfig",
    template="train.py",
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
)

METHODS: dict[str, MethodDefinition] = {"sft": SFT, "dpo": DPO, "grpo": GRPO}


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

    valid = config_fields(method.config_class)
    return {k: difflib.get_close_matches(k, valid, n=3) for k in keys if k not in valid}


def config_fields(config_class: str) -> list[str]:
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
        import trl

        known[config_class] = sorted(f.name for f in dataclasses.fields(getattr(trl, config_class)))
        write_text(path, json.dumps(known, indent=1))  # atomic: a concurrent reader sees old or new
    return known[config_class]


SECRET_LIKE = ("token", "password", "secret", "api_key")


def check_training_keys(spec: RunSpec) -> None:
    """Refuse a secret-looking or unknown `training` key before anything is written."""
    method = method_definition(spec.method)
    secrets = [k for k in spec.training if any(s in k.lower() for s in SECRET_LIKE)]
    if secrets:
        raise SpecError(
            f"training.{secrets[0]} looks like a secret; secrets never go into the spec or the script. "
            "Set HF_TOKEN in the environment (or a Prefect Secret block) instead."
        )
    unknown = unknown_training_keys(method, list(spec.training))
    if unknown:
        parts = [
            f"'{k}'" + (f" (did you mean {', '.join(repr(m) for m in near)}?)" if near else "")
            for k, near in unknown.items()
        ]
        raise SpecError(f"training: unknown {method.config_class} option(s): {', '.join(parts)}")
