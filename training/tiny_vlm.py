"""The embedded vision-language default (``model: tiny-vl``), built offline and deterministically.

A random-init Qwen2.5-VL, the smallest its GGUF converter accepts (vision depth 4 with full
attention in blocks 1 and 3, evenly spaced; depth 2 fails to map the merger), on the tiny text
model's tokenizer with Qwen2-VL's vision tokens added, a ChatML template that renders an image
part as Qwen2-VL does, and Qwen2-VL's image processor kept small (56x56 to 112x112 pixels: 4 to
16 image tokens an image). Every weight row of the language model is 256 or 512 wide, so
llama.cpp's k-quants apply. Measured choices: docs/vision-language-probe.md.
"""

from __future__ import annotations

from pathlib import Path

from training.templates.finetune_vision import patch_no_torchvision
from training.tiny_model import (
    ARCHITECTURE,
    build_once,
    build_tokenizer,
    cache_root,
    hash_recipe,
    recipe_hash,
    save_built,
)

RECIPE_VERSION = 1
TINY_VLM_NAME = "tiny-vl"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# the text side is the tiny text model's shape; mrope's sections sum to head_dim / 2 = 32
TEXT = {**ARCHITECTURE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}}
TEXT.pop("rope_theta")
VISION = {
    "depth": 4,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_heads": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1, 3],
    "hidden_act": "silu",
}
IMAGE_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
SEED = 0


def vlm_recipe_hash() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "text": TEXT,
        "vision": VISION,
        "pixels": IMAGE_PIXELS,
        "template": CHAT_TEMPLATE,
        "tokens": VISION_TOKENS,
        "seed": SEED,
        "tokenizer": recipe_hash(),
    }
    return hash_recipe(recipe)


def tiny_vlm_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"tiny-qwen25vl-{vlm_recipe_hash()}"


def build_processor():
    """Qwen2.5-VL's processor around the tiny tokenizer, without torchvision (its video slot
    gets a plain BaseVideoProcessor)."""
    patch_no_torchvision()
    import transformers.video_processing_utils as video_utils
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VISION_TOKENS]})
    tokenizer.chat_template = CHAT_TEMPLATE
    images = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2, **IMAGE_PIXELS)
    return Qwen2_5_VLProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=video_utils.BaseVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def _build_into(target: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    token = tokenizer.convert_tokens_to_ids
    eos, pad = token("<|im_end|>"), token("<|endoftext|>")
    config = Qwen2_5_VLConfig(
        text_config={
            **TEXT,
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": eos,
            "pad_token_id": pad,
        },
        vision_config={**VISION, "out_hidden_size": TEXT["hidden_size"]},
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    save_built(target, model, processor, {"recipe_hash": vlm_recipe_hash(), "text": TEXT, "vision": VISION})


def ensure_tiny_vlm(root: Path | None = None) -> Path:
    """Return the cached tiny vision-language model folder, building it first if it is missing."""
    return build_once(tiny_vlm_dir(root), _build_into)


if __name__ == "__main__":
    print(ensure_tiny_vlm())
