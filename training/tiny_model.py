"""The embedded default model (``model: tiny``), built offline and deterministically.

A byte-level BPE tokenizer trained with ``tokenizers`` on the shipped text, with a ChatML
chat template, and a random-init Qwen2 whose every weight row is a multiple of 256 (hidden
256, intermediate 512) so that llama.cpp's k-quants apply. Built once into a cache folder
keyed by a hash of the recipe, then reused.

The tokenizer splits exactly as Qwen2's does (NFC normalizer, Qwen2's split regex,
byte-level without its own regex): transformers rebuilds a ``Qwen2Tokenizer`` from vocab
and merges with that pipeline, so anything else would give different ids after a reload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.example_data import tokenizer_corpus

RECIPE_VERSION = 1
TINY_MODEL_NAME = "tiny"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split pattern, verbatim from its tokenizer.json.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}
SEED = 0


def cache_root() -> Path:
    """Where built artifacts live; override with ``FINETUNE_CACHE_DIR``."""
    env = os.environ.get("FINETUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "finetune-flow"


def recipe_hash() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "vocab": VOCAB_SIZE,
        "special": SPECIAL_TOKENS,
        "pattern": QWEN2_SPLIT_PATTERN,
        "template": CHAT_TEMPLATE,
        "arch": ARCHITECTURE,
        "seed": SEED,
        "corpus": tokenizer_corpus(),
    }
    return hash_recipe(recipe)


def hash_recipe(recipe: dict) -> str:
    """A built model's folder suffix: another recipe, another folder."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"tiny-qwen2-{recipe_hash()}"


def build_tokenizer():
    """Train the byte-level BPE; deterministic for a fixed corpus and vocab size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
    )


def _build_into(target: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **ARCHITECTURE,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    save_built(target, model, tokenizer, {"recipe_hash": recipe_hash(), "architecture": ARCHITECTURE})


def save_built(target: Path, model: Any, processing: Any, record: dict) -> None:
    """A built model with its tokenizer (or processor), the tokenizer's class written out, and
    the recipe's record last: `build_once` trusts a folder that has it."""
    model.save_pretrained(target, safe_serialization=True)
    processing.save_pretrained(target)
    # transformers reloads this as Qwen2Tokenizer; keep the class explicit for other tools.
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (target / "tiny_recipe.json").write_text(json.dumps(record, indent=2))


def ensure_tiny_model(root: Path | None = None) -> Path:
    """Return the cached tiny model folder, building it first if it is missing."""
    return build_once(tiny_model_dir(root), _build_into)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build` unless a finished build is there (its tiny_recipe.json).

    Built in a temporary sibling folder and renamed into place, so a crash never leaves a
    half-written model that later runs would trust, and concurrent builders do not collide.
    """
    if (target / "config.json").exists() and (target / "tiny_recipe.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "tiny_recipe.json").exists():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_tiny_model())
