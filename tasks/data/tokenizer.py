"""The tokenizer planning measures rows with."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def planning_tokenizer(model_path: str, chat_template_path: str | None = None) -> Any:
    """The model's tokenizer when it can encode, else a stated characters-per-token estimate
    (the plan, its JSON and the report say so, and a real run refuses it). A chat template
    named by training.chat_template_path is applied as TRL will apply it."""
    from tasks.core.model_source import ModelSourceError, load_config, load_tokenizer
    from tasks.data.token_stats import CharEstimateTokenizer, tokenizer_problem

    try:
        model_type = getattr(load_config(model_path), "model_type", None)
    except ModelSourceError:
        model_type = None
    try:
        tokenizer = load_tokenizer(model_path)
    except ModelSourceError as e:
        return CharEstimateTokenizer(model_type, f"could not be read ({str(e)[:120]})")
    problem = tokenizer_problem(tokenizer)
    if problem:
        return CharEstimateTokenizer(model_type, problem)
    if chat_template_path:
        import copy

        tokenizer = copy.copy(tokenizer)  # the cached tokenizer stays as the model has it
        if Path(chat_template_path).is_file():
            tokenizer.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
        else:
            tokenizer.chat_template = load_tokenizer(chat_template_path).chat_template
    return tokenizer
