"""What a vision-language model does with an image: its processor's own token count.

Planning counts the tokens an image becomes by asking the model's processor
(`_get_num_multimodal_tokens`, which every transformers vision processor implements for
serving engines), at the processor's own resize settings, so the count is the one training will
see; nothing here re-derives a family's resize rules.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tasks.core.model_source import is_vision_model
from tasks.core.models import ImageStats

FAR_LARGER = 4  # an image with this many times the pixels its processor keeps gets a warning


def architecture(config: Any) -> str:
    names = getattr(config, "architectures", None) or []
    return names[0] if names else str(getattr(config, "model_type", "unknown"))


class ImageTokens:
    """Tokens per image size (width, height) for one model's processor, memoised per size."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self._cache: dict[tuple[int, int], int] = {}

    def __call__(self, size: tuple[int, int]) -> int:
        if size not in self._cache:
            width, height = size
            data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            self._cache[size] = int(data.num_image_tokens[0])
        return self._cache[size]

    def kept_pixels(self, size: tuple[int, int]) -> int | None:
        """The pixels the processor keeps of an image, where its settings say (pixel budgets in
        the Qwen2-VL family, a longest edge in Idefics3/SmolVLM, a fixed square in Gemma 3)."""
        images = self.processor.image_processor
        width, height = size
        merge, patch = getattr(images, "merge_size", None), getattr(images, "patch_size", None)
        if merge and patch:
            return self(size) * (merge * patch) ** 2
        edges = getattr(images, "size", None) or {}
        if "longest_edge" in edges:
            scale = min(1.0, edges["longest_edge"] / max(width, height))
            return int(width * scale) * int(height * scale)
        if "height" in edges and "width" in edges:
            return int(edges["height"]) * int(edges["width"])
        return None


class ImagesOnly:
    """A processor's image counts where only its image processor can be read (a folder with the
    config and preprocessor_config.json but no tokenizer): the counts that need no tokenizer,
    as the processor computes them. Qwen2-VL's family: its image processor's patches over the
    merge size squared; Gemma 3: its processor_config's fixed `image_seq_length`."""

    def __init__(self, image_processor: Any, processor_config: dict[str, Any]) -> None:
        self.image_processor = image_processor
        self.fixed = processor_config.get("image_seq_length")
        if not (self.fixed or getattr(image_processor, "merge_size", None)):
            raise ValueError(
                f"{type(image_processor).__name__}'s image tokens depend on the tokenizer, which could not be read"
            )

    def _get_num_multimodal_tokens(self, image_sizes: list[tuple[int, int]]) -> Any:
        from types import SimpleNamespace

        if self.fixed:
            return SimpleNamespace(num_image_tokens=[int(self.fixed)] * len(image_sizes))
        merge = self.image_processor.merge_size
        patches = [self.image_processor.get_number_of_image_patches(h, w, {}) for h, w in image_sizes]
        return SimpleNamespace(num_image_tokens=[n // merge**2 for n in patches])


@lru_cache(maxsize=4)
def image_tokens_for(model_path: str) -> ImageTokens:
    """The processor of a vision-language model (its folder or Hub id), read once; its image
    processor alone where the tokenizer cannot be read (`ImagesOnly`)."""
    from tasks.core.model_source import ModelSourceError, load_processor

    try:
        return ImageTokens(load_processor(model_path))
    except ModelSourceError as e:
        return ImageTokens(_images_only(model_path, e))


def _images_only(model_path: str, why: Exception) -> ImagesOnly:
    import json
    from pathlib import Path

    from transformers import AutoImageProcessor

    from tasks.core.model_source import ModelSourceError

    try:
        images = AutoImageProcessor.from_pretrained(model_path)
        extra = Path(model_path) / "processor_config.json"
        return ImagesOnly(images, json.loads(extra.read_text()) if extra.is_file() else {})
    except Exception as e:  # transformers raises many types; say what was tried
        raise ModelSourceError(f"{why}; its image processor alone did not do either: {e}") from None


class ImageTally:
    """The images of the rows that passed, tallied block by block as the validation merges them."""

    def __init__(self, tokens: ImageTokens) -> None:
        self.tokens = tokens
        self.images = self.rows_with = self.rows_without = self.total = self.far_larger = 0
        self.smallest, self.largest, self.example = 1 << 62, 0, ""

    def add(self, sizes: list[list[tuple[int, int]]], numbers: list[int]) -> list[int]:
        """Counts a block's rows; returns each row's tokens beyond its rendered text (an image's
        tokens less the one placeholder token its chat template writes)."""
        extra = []
        for number, row in zip(numbers, sizes, strict=True):
            counts = [self.tokens(size) for size in row]
            self.images += len(row)
            self.rows_with += bool(row)
            self.rows_without += not row
            self.total += sum(counts)
            self.smallest, self.largest = min([self.smallest, *counts]), max([self.largest, *counts])
            for size, n in zip(row, counts, strict=True):
                kept = self.tokens.kept_pixels(size)
                if kept and size[0] * size[1] > FAR_LARGER * kept:
                    self.far_larger += 1
                    self.example = self.example or (
                        f"row {number}: {size[0]}x{size[1]} px, about {kept} px kept ({n} tokens)"
                    )
            extra.append(sum(counts) - len(counts))
        return extra

    def stats(self, staged: str) -> ImageStats:
        return ImageStats(
            images=self.images,
            rows_with_images=self.rows_with,
            rows_without_images=self.rows_without,
            tokens_per_image_min=self.smallest if self.images else 0,
            tokens_per_image_max=self.largest,
            tokens_per_image_mean=round(self.total / self.images, 2) if self.images else 0.0,
            image_tokens=self.total,
            far_larger=self.far_larger,
            far_larger_example=self.example,
            staged=staged,
        )

    def warnings(self) -> list[str]:
        found = []
        if self.rows_without:
            found.append(f"{self.rows_without} row(s) have no image: allowed, they train the language model alone")
        if self.far_larger:
            found.append(
                f"{self.far_larger} image(s) have over {FAR_LARGER}x the pixels the processor keeps and will be "
                f"resized down (first: {self.example}); smaller files would validate and load faster"
            )
        return found


class ModelInputs:
    """What a model takes in, as validation needs it: images (with their token counts) or text
    only; `unreadable` says why a vision model's image tokens cannot be counted."""

    def __init__(self, architecture: str, image_tokens: ImageTokens | None, unreadable: str = "") -> None:
        self.architecture, self.image_tokens, self.unreadable = architecture, image_tokens, unreadable
        self.vision = image_tokens is not None or bool(unreadable)

    def refuse_images(self, source: str) -> str:
        if self.unreadable:
            return (
                f"{source}: the rows have images, and the tokens they become cannot be counted: {self.unreadable}. "
                "Give the model as a folder (or Hub id) with its processor files (preprocessor_config.json and "
                "the tokenizer)"
            )
        return (
            f"{source}: the rows have images, and the model is text-only ({self.architecture}): it cannot see them. "
            "Use a vision-language model (`model: tiny-vl` here, or e.g. Qwen/Qwen2.5-VL-3B-Instruct, "
            "HuggingFaceTB/SmolVLM-256M-Instruct), or train on the text alone by dropping the `images` column and the "
            "{type: image} parts"
        )

    def with_chat_template(self, tokenizer: Any) -> Any:
        """The tokenizer, with its processor's chat template where only the processor has one (a
        vision model may keep it in chat_template.json, which its tokenizer does not read)."""
        processor = self.image_tokens.processor if self.image_tokens else None
        template = getattr(processor, "chat_template", None)
        if not template or getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "chat_template"):
            return tokenizer
        import copy

        tokenizer = copy.copy(tokenizer)  # the cached tokenizer stays as the model has it
        tokenizer.chat_template = template
        return tokenizer

    def text_only_warning(self) -> str:
        return (
            f"the model is a vision-language model ({self.architecture}) and no row has an image: allowed, but only "
            "the language model learns; its vision tower is not trained"
        )


def planning_inputs(model_path: str, chat_template_path: str | None = None) -> tuple[Any, ModelInputs]:
    """What rows are measured with (the tokenizer, with the processor's chat template where only
    the processor has one) and what the model takes in: for the training rows and an evaluation
    set alike."""
    from tasks.data.tokenizer import planning_tokenizer

    inputs = model_inputs(model_path)
    return inputs.with_chat_template(planning_tokenizer(model_path, chat_template_path)), inputs


def model_inputs(model_path: str) -> ModelInputs:
    """The model's inputs from its config; a vision model's processor is read only then."""
    from tasks.core.model_source import ModelSourceError, load_config

    try:
        config = load_config(model_path)
    except ModelSourceError:
        return ModelInputs("unknown (its config could not be read)", None)
    if not is_vision_model(config):
        return ModelInputs(architecture(config), None)
    try:
        return ModelInputs(architecture(config), image_tokens_for(model_path))
    except ModelSourceError as e:
        return ModelInputs(architecture(config), None, str(e))
