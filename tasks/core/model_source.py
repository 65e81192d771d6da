"""Resolving the spec's `model` to something loadable: the tiny default, a folder or a Hub id."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.core.errors import UserFacingError
from tasks.core.spec import RunSpec
from training.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from training.tiny_vlm import TINY_VLM_NAME, ensure_tiny_vlm

# where a multimodal model keeps its vision/audio towers and projectors: frozen in training,
# written to the projector file (not the language model's GGUF)
TOWER_MARKERS = ("vision", "visual", "audio", "multi_modal_projector", "mm_projector", "connector", "image_newline")


def in_tower(name: str) -> bool:
    """A parameter or module of a multimodal model's towers, by its name."""
    return any(m in name for m in TOWER_MARKERS)


class ModelSourceError(UserFacingError, ValueError):
    """The model's config or tokenizer could not be read; says where it looked."""


def resolve_model(model: str) -> str:
    """A local folder path for `tiny` and folders; the Hub id unchanged otherwise."""
    if model == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    if model == TINY_VLM_NAME:
        return str(ensure_tiny_vlm())
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) and not path.exists():
        raise ModelSourceError(
            f"model folder {path} does not exist (paths in a spec are relative to the spec file). Train or "
            "download it first, train it in an earlier stage of a recipe (python -m flows.recipe), or use `model: tiny` or a "
            "Hub id"
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if model.count("/") != 1:
        raise ModelSourceError(
            f"model '{model}' is neither 'tiny', 'tiny-vl', an existing folder, nor a Hub id of the form 'owner/name'"
        )
    return model


def _offline_hint(model: str, what: str, err: Exception) -> ModelSourceError:
    """Why the model could not be read, by the kind of fault, and what to do."""
    from tasks.core.faults import hub_read_failure

    why = hub_read_failure(
        err,
        "model",
        "TRANSFORMERS_OFFLINE",
        "accept its terms on its Hub page and set HF_TOKEN to a token of an account that has access",
    )
    return ModelSourceError(
        f"could not read the {what} of '{model}': {why}. "
        "If this machine is offline, download the model to a folder and set `model:` to that folder, "
        "or use `model: tiny`."
    )


def _read(what: str, model_path: str, fn: Callable[[], Any]) -> Any:
    """Read from a folder once, or from the Hub with retries on transient faults."""
    from tasks.core.faults import read_with_retries

    try:
        return read_with_retries(fn, f"the {what} of {model_path}", local=Path(model_path).is_dir())
    except Exception as e:  # transformers/hub raise many types; the kind and message matter
        raise _offline_hint(model_path, what, e) from None


@lru_cache(maxsize=8)
def load_config(model_path: str) -> Any:
    from transformers import AutoConfig

    return _read("config.json", model_path, lambda: AutoConfig.from_pretrained(model_path))


@lru_cache(maxsize=8)
def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return _read("tokenizer", model_path, lambda: AutoTokenizer.from_pretrained(model_path))


@lru_cache(maxsize=4)
def load_processor(model_path: str) -> Any:
    """A vision-language model's processor: its image processor, tokenizer and chat template."""
    from training.templates.finetune_vision import patch_no_torchvision

    patch_no_torchvision()
    from transformers import AutoProcessor

    return _read("processor", model_path, lambda: AutoProcessor.from_pretrained(model_path))


def is_vision_model(config: Any) -> bool:
    """A model with a vision tower (its config nests one), e.g. Qwen2.5-VL, SmolVLM, Gemma 3."""
    return getattr(config, "vision_config", None) is not None


def auto_model_class(config: Any) -> Any:
    """The transformers Auto class a model trains with: a vision-language model as
    image-text-to-text, anything else as a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_model(config) else AutoModelForCausalLM


def context_length(config: Any) -> int:
    """The longest sequence the model was built for (where rows kept whole must stop)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", None) or 131072)


def baseline_path(spec: RunSpec, model_path: str, heldout_rows: int) -> str | None:
    """The model the trained one is also compared with (a recipe's base), when it is not the
    model this run starts from and there are rows to compare on."""
    if spec.evaluation.baseline is None or heldout_rows == 0:
        return None
    path = resolve_model(spec.evaluation.baseline)
    return None if path == model_path else path
