"""Vision-language helpers the generated script imports (copied beside it for vision runs).

Self-contained on purpose: the training side imports nothing from the engine.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any


def patch_no_torchvision() -> None:
    """Let a Qwen2-VL-style processor load where torchvision is not installed.

    Its processor has a video slot whose classes need torchvision, although images alone do
    not; where only CUDA builds of torchvision exist for a CPU torch, none can be installed
    (docs/vision-language-probe.md). This exposes transformers' own VideoProcessorMixin to the
    processor's class check and gives the video slot a plain BaseVideoProcessor. A no-op
    wherever torchvision is importable.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    import transformers.processing_utils as processing_utils
    import transformers.video_processing_utils as video_utils

    auto = importlib.import_module("transformers.models.auto.video_processing_auto")
    processing_utils.transformers_module.VideoProcessorMixin = video_utils.VideoProcessorMixin
    auto.AutoVideoProcessor.from_pretrained = classmethod(lambda cls, *a, **k: video_utils.BaseVideoProcessor())


def load_processor(model_path: str) -> Any:
    """The model's processor (image processor, tokenizer and chat template)."""
    patch_no_torchvision()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path)


def with_images(dataset, folder: Path):
    """The rows' `images` (paths relative to the data file's folder) as images the trainer's
    collator hands to the processor, decoded as each row is read."""
    from datasets import Image, List

    if "images" not in dataset.column_names:
        return dataset
    dataset = dataset.map(lambda row: {"images": [str(folder / p) for p in row["images"] or []]})
    return dataset.cast_column("images", List(Image()))
