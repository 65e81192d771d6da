"""Measuring rows in tokens: the model's own (fast) tokenizer on batches of texts, or a
stated characters-per-token estimate when it cannot encode, and the length histogram."""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.data.schemas import shared_prefix


def histogram(lengths: list[int], max_length: int, bins: int = 10) -> list[tuple[int, int, int]]:
    """Rows per token-length bin (from, to]: equal bins over the lengths seen, split at max_length
    when it falls inside, so the rows that truncation cuts have bins of their own."""
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    width = max(1, -(-(top - low + 1) // bins))
    start = max(0, low - 1 - (low - 1) % width)
    edges = list(range(start, top + width, width))
    if edges[0] < max_length < edges[-1] and max_length not in edges:
        edges = sorted([*edges, max_length])
    return [(lo, hi, sum(1 for x in lengths if lo < x <= hi)) for lo, hi in zip(edges, edges[1:], strict=False)]


# Characters per token of each family's tokenizer on English chat text: a stated assumption
# used only when the model's tokenizer cannot encode (a config-only folder, a Hub model
# planned offline). Larger vocabularies pack more characters into a token.
CHARS_PER_TOKEN = {
    "llama": 4.0,  # Llama 3.x, 128k vocabulary
    "qwen2": 3.8,
    "qwen2_moe": 3.8,
    "qwen3": 3.8,
    "qwen3_moe": 3.8,
    "gemma": 4.2,
    "gemma2": 4.2,
    "gemma3": 4.2,
    "gemma3_text": 4.2,
    "mistral": 3.5,  # 32k vocabulary
    "mixtral": 3.5,
    "phi3": 3.5,
}
DEFAULT_CHARS_PER_TOKEN = 4.0
PROBE_TEXT = "Hello, world! The quick brown fox jumps over 13 lazy dogs."


class CharEstimateTokenizer:
    """Stands in when the model's tokenizer cannot encode: the family's characters per token,
    plus four tokens of chat markup per turn. `why` says what was wrong with the real one."""

    def __init__(self, model_type: str | None = None, why: str = "it could not be read") -> None:
        self.model_type = model_type
        self.chars_per_token = CHARS_PER_TOKEN.get(model_type or "", DEFAULT_CHARS_PER_TOKEN)
        self.why = why
        self.chat_template = "estimate"

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [0] * max(1, round(len(text) / self.chars_per_token))}

    def apply_chat_template(self, turns: list[dict], tokenize: bool = False) -> str:
        return "".join(f"<|{t.get('role')}|>{t.get('content') or ''}<|end|>" for t in turns)

    def describe(self) -> str:
        family = f"{self.model_type} family" if self.model_type in CHARS_PER_TOKEN else "no known family"
        return (
            f"token counts are ESTIMATED at {self.chars_per_token} characters per token ({family}), because the "
            f"model's tokenizer {self.why}; a real run needs the model's tokenizer files (tokenizer.json, "
            "tokenizer_config.json) next to its config.json"
        )


def tokenizer_problem(tokenizer: Any) -> str | None:
    """Why a loaded tokenizer cannot be trusted to count tokens, or None. transformers builds
    an empty tokenizer for a folder with only config.json: a vocabulary of 1 that encodes
    every text to no tokens."""
    try:
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        size = len(tokenizer)
    except Exception as e:
        return f"fails to encode text ({type(e).__name__}: {e})"
    if size < 100 or len(ids) == 0:
        return f"is empty (a vocabulary of {size}; a test sentence encodes to {len(ids)} tokens)"
    return None


def _texts(tokenizer: Any, fmt: str, row: dict) -> list[str]:
    """The text(s) of a row as the trainer sees them; a preference row gives one per side."""

    def render(v: Any) -> str:
        return tokenizer.apply_chat_template(v, tokenize=False) if isinstance(v, list) else v

    if fmt in ("preference", "implicit_preference", "vision_preference"):
        prompt = row.get("prompt", [] if isinstance(row["chosen"], list) else "")
        return [render(prompt + row[side]) for side in ("chosen", "rejected")]
    if fmt == "prompt_only":
        return [render(row["prompt"])]
    if fmt in ("messages", "vision"):  # an image counts here as its placeholder; its tokens are added apart
        return [render(row["messages"])]
    if fmt in ("prompt_completion", "unpaired"):
        return [render(row["prompt"]) + render(row["completion"])]
    return [row["text"]]


def token_lengths(tokenizer: Any, fmt: str, rows: list[dict], batch: int = 1000) -> list[int]:
    """Tokens per row (the longer side of a preference pair), the tokenizer called on batches
    of texts: a fast (Rust) tokenizer encodes a batch in parallel, many times quicker than row
    by row."""
    lengths: list[int] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        texts = [_texts(tokenizer, fmt, r) for r in chunk]
        flat = [t for ts in texts for t in ts]
        ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
        at = 0
        for ts in texts:
            lengths.append(max(len(i) for i in ids[at : at + len(ts)]))
            at += len(ts)
    return lengths


def prompt_lengths(tokenizer: Any, rows: list[dict], batch: int = 1000) -> list[int]:
    """Tokens of each preference row's prompt (explicit, or the shared prefix of both sides),
    encoded in batches like `token_lengths`."""
    texts = []
    for row in rows:
        prompt = row.get("prompt")
        if prompt is None:
            prompt = row["chosen"][: shared_prefix(row["chosen"], row["rejected"])]
        texts.append(tokenizer.apply_chat_template(prompt, tokenize=False) if isinstance(prompt, list) else prompt)
    lengths: list[int] = []
    for start in range(0, len(texts), batch):
        lengths.extend(len(i) for i in tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"])
    return lengths


class Reservoir:
    """A uniform sample of at most `size` items from a stream of unknown length (Algorithm R,
    drawn a block at a time with numpy), seeded so the same data gives the same sample: token
    statistics of a dataset too large to tokenize whole are measured on it, and the report
    says so."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seen, self.items = size, 0, []
        self._rng = np.random.default_rng(seed)

    def offer(self, items: list[Any]) -> None:
        room = min(len(items), self.size - len(self.items))
        self.items.extend(items[:room])
        self.seen += room
        rest = items[room:]
        if not rest:
            return
        # item number n (1-based) replaces slot j, drawn uniformly from [0, n), when j < size
        n = np.arange(self.seen + 1, self.seen + len(rest) + 1)
        slots = (self._rng.random(len(rest)) * n).astype(np.int64)
        for k in np.flatnonzero(slots < self.size):
            self.items[slots[k]] = rest[k]
        self.seen += len(rest)
