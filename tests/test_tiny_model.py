"""The embedded default: built offline, deterministic, GGUF-friendly, reusable."""

from __future__ import annotations

import hashlib
from pathlib import Path

from training.tiny_model import ensure_tiny_model, tiny_model_dir


def _digest(folder: Path) -> dict[str, str]:
    names = ["model.safetensors", "tokenizer.json", "config.json"]
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_building_twice_gives_identical_files(tiny_model_path: str, tmp_path: Path):
    again = ensure_tiny_model(tmp_path / "other-cache")
    assert _digest(Path(tiny_model_path)) == _digest(again)


def test_it_is_built_once_and_reused(tiny_cache: Path, tiny_model_path: str):
    before = (Path(tiny_model_path) / "model.safetensors").stat().st_mtime_ns
    assert str(ensure_tiny_model(tiny_cache)) == tiny_model_path == str(tiny_model_dir(tiny_cache))
    assert (Path(tiny_model_path) / "model.safetensors").stat().st_mtime_ns == before


def test_every_weight_row_is_a_multiple_of_256(tiny_model_path: str):
    from safetensors import safe_open

    with safe_open(str(Path(tiny_model_path) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if len(shape) == 2:
                assert shape[-1] % 256 == 0, (name, shape)


def test_a_real_architecture_that_loads_with_auto_classes(tiny_model_path: str, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"


def test_the_reloaded_tokenizer_gives_the_trained_ids(tiny_tokenizer):
    from training.tiny_model import build_tokenizer

    fresh = build_tokenizer()
    for text in [
        "What is 7 + 12?",
        "I'm here; they've  gone\n\n tabs\t",
        "Héllo wörld 🙂 1234",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert tiny_tokenizer(text)["input_ids"] == fresh(text)["input_ids"]
        assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_the_chat_template_is_chatml(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids  # a single special token
