"""Deterministic generator for the shipped example datasets and the tiny tokenizer's corpus.

The task is small-number arithmetic: a tiny random-init model learns its format within a
few hundred CPU steps (the loss falls clearly), and its answers are verifiable, which the
GRPO demo reuses. Run ``python -m training.example_data`` to rewrite ``examples/data/``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261125
MAX_OPERAND = 20
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"

# General prose so the tokenizer learns ordinary English merges, not only arithmetic.
GENERAL_TEXT = """\
A small model learns the shape of its answers long before it learns the answers themselves.
Fine-tuning adapts a pretrained language model to a task with a modest amount of data.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Please answer the question briefly and show the result at the end of your reply.
You are a helpful assistant. Think step by step, then give the final answer.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 appear often in everyday text.
The weather today is sunny with a light breeze; tomorrow it may rain in the afternoon.
Training loss falls as the model fits the data, and evaluation shows whether it generalises.
Questions, answers, instructions and responses: every chat is a list of turns.
"""


def _operands(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """n distinct operand pairs (there are (MAX_OPERAND + 1) ** 2 in all), in random order."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rng.shuffle(pairs)
    return pairs[:n]


def sft_chat_rows(n: int = 400, seed: int = SEED) -> list[dict]:
    """Chat rows in the ``messages`` format."""
    rng = random.Random(seed)
    rows = []
    for a, b in _operands(rng, n):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
                ]
            }
        )
    return rows


def sft_prompt_completion_rows(n: int = 400, seed: int = SEED + 1) -> list[dict]:
    """Plain-text rows in the ``prompt``/``completion`` format."""
    rng = random.Random(seed)
    return [{"prompt": f"Add {a} and {b}.", "completion": f" The sum is {a + b}."} for a, b in _operands(rng, n)]


def dpo_pair_rows(n: int = 300, seed: int = SEED + 2) -> list[dict]:
    """Preference pairs: the crisp `a + b = c` answer is chosen over a hedging, wrong one.
    A style the tiny model can pick up in a few dozen DPO steps (margin and accuracy rise)."""
    rng = random.Random(seed)
    hedges = ["I am not sure, maybe {w}.", "Hard to say. Perhaps {w}?", "I think it is {w}, but I cannot check."]
    rows = []
    for a, b in _operands(rng, n):
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                "rejected": [{"role": "assistant", "content": rng.choice(hedges).format(w=wrong)}],
            }
        )
    return rows


def kto_rows(n: int = 300, seed: int = SEED + 7) -> list[dict]:
    """Unpaired answers for KTO, each to its own question: the crisp `a + b = c` labelled
    desirable, a hedging wrong answer labelled undesirable, in equal numbers (KTO weighs one
    kind against the other); no prompt has both, so nothing here is a pair in disguise."""
    rng = random.Random(seed)
    hedges = ["I am not sure, maybe {w}.", "Hard to say. Perhaps {w}?", "I think it is {w}, but I cannot check."]
    rows = []
    for i, (a, b) in enumerate(_operands(rng, n)):
        desirable = i % 2 == 0
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        answer = f"{a} + {b} = {a + b}" if desirable else rng.choice(hedges).format(w=wrong)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "completion": [{"role": "assistant", "content": answer}],
                "label": desirable,
            }
        )
    return rows


def grpo_prompt_rows(seed: int = SEED + 3) -> list[dict]:
    """Every single-digit addition as a prompt with its `answer`, for verifiable rewards."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    return [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)} for a, b in pairs]


def answer_form_rows(n: int = 40, seed: int = SEED + 6) -> list[dict]:
    """A multiple-choice task for lm-evaluation-harness (examples/evals/answer_form.yaml): the
    same correct sum in four wordings, of which one is the form the SFT data teaches
    ("a + b = c"). It measures whether the model answers in the trained form, not whether it
    adds correctly (the tiny model learns the form, hardly the sums)."""
    rng = random.Random(seed)
    rows = []
    for i, (a, b) in enumerate(_operands(rng, n)):
        c = a + b
        choices = [f"{a} + {b} = {c}", f"I think it is {c}", f"The sum is {c}.", f"{c}, I believe"]
        order = list(range(4))
        rng.shuffle(order)
        rows.append(
            {
                "id": i,
                "question": f"What is {a} + {b}?",
                "choices": [choices[j] for j in order],
                "label": order.index(0),
            }
        )
    return rows


def tokenizer_corpus() -> list[str]:
    """The text the tiny tokenizer is trained on: the shipped examples plus general prose."""
    lines = GENERAL_TEXT.splitlines()
    for row in sft_chat_rows():
        lines.extend(m["content"] for m in row["messages"])
    for row in sft_prompt_completion_rows():
        lines.append(row["prompt"] + row["completion"])
    return lines


def _binarized_rows(wrong: list[tuple[int, int, int]]) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized's layout: the prompt as text, and chosen and rejected
    as whole conversations that repeat it, with their scores."""
    return [
        {
            "prompt": f"What is {a} + {b}?",
            "chosen": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
            ],
            "rejected": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"It is {w}."},
            ],
            "score_chosen": 9.0,
            "score_rejected": 2.5,
        }
        for a, b, w in wrong
    ]


def format_sample_rows(seed: int = SEED + 4, n: int = 60) -> dict[str, list[dict]]:
    """The same arithmetic task in the formats users bring (shipped under examples/data/formats/
    to test recognition and conversion; none is downloaded)."""
    rng = random.Random(seed)
    pairs = _operands(rng, n)
    wrong = [(a, b, a + b + rng.choice((-3, -2, -1, 1, 2, 3))) for a, b in pairs]
    return {
        "sharegpt.jsonl": [
            {
                "conversations": [
                    {"from": "system", "value": "You add numbers."},
                    {"from": "human", "value": f"What is {a} + {b}?"},
                    {"from": "gpt", "value": f"{a} + {b} = {a + b}"},
                ]
            }
            for a, b in pairs
        ],
        "alpaca.jsonl": [
            {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} + {b} = {a + b}"}
            for a, b in pairs
        ],
        "question_answer.jsonl": [{"question": f"What is {a} + {b}?", "answer": f"{a + b}"} for a, b in pairs],
        "hh_rlhf.jsonl": [
            {
                "chosen": f"\n\nHuman: What is {a} + {b}?\n\nAssistant: {a} + {b} = {a + b}",
                "rejected": f"\n\nHuman: What is {a} + {b}?\n\nAssistant: I think it is {w}.",
            }
            for a, b, w in wrong
        ],
        "ultrafeedback.jsonl": [
            {
                "instruction": f"What is {a} + {b}?",
                "completions": [
                    {"model": "good", "response": f"{a} + {b} = {a + b}", "overall_score": 9.0},
                    {"model": "bad", "response": f"It is {w}.", "overall_score": 2.5},
                    {"model": "vague", "response": "A number.", "overall_score": 4.0},
                ],
            }
            for a, b, w in wrong
        ],
        "ultrafeedback_binarized.jsonl": _binarized_rows(wrong),
        "kto.jsonl": [
            {"prompt": f"What is {a} + {b}?", "completion": f"{a + b}" if i % 2 else f"{w}", "label": bool(i % 2)}
            for i, (a, b, w) in enumerate(wrong)
        ],
        "math_solutions.jsonl": [{"problem": f"What is {a} + {b}?", "solution": f"{a + b}"} for a, b in pairs],
    }


SENTENCES = [line for line in GENERAL_TEXT.splitlines() if line]


def chat_rows_at_scale(n: int, seed: int = SEED + 5, spread: str = "short"):
    """n chat rows, yielded one at a time (millions fit in no memory): arithmetic questions with
    1-3 exchanges and sometimes a system turn. `spread="short"` keeps answers to a sentence or
    two, like instruction data; `"realistic"` mixes in long answers (a log-normal number of
    sentences, most short, a tail of hundreds of tokens) as real chat datasets do."""
    rng = random.Random(seed)
    for _ in range(n):
        turns = [{"role": "system", "content": SENTENCES[4]}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            sentences = 1 + (int(rng.lognormvariate(1.0, 1.1)) if spread == "realistic" else rng.randint(0, 2))
            prose = " ".join(rng.choice(SENTENCES) for _ in range(sentences - 1))
            turns.append({"role": "user", "content": f"What is {a} + {b}?"})
            turns.append({"role": "assistant", "content": f"{prose} {a} + {b} = {a + b}.".strip()})
        yield {"messages": turns}


def write_jsonl_stream(rows, path: Path) -> int:
    """Write rows from an iterator, in blocks; returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, count, block = path.with_suffix(path.suffix + ".tmp"), 0, []
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            block.append(json.dumps(row, ensure_ascii=False))
            count += 1
            if len(block) == 10_000:
                f.write("\n".join(block) + "\n")
                block = []
        if block:
            f.write("\n".join(block) + "\n")
    tmp.replace(path)
    return count


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def write_examples(out_dir: Path = EXAMPLES_DIR) -> list[Path]:
    files = {
        "sft_chat.jsonl": sft_chat_rows(),
        "sft_prompt_completion.jsonl": sft_prompt_completion_rows(),
        "dpo_pairs.jsonl": dpo_pair_rows(),
        "kto_rows.jsonl": kto_rows(),
        "grpo_prompts.jsonl": grpo_prompt_rows(),
        "answer_form.jsonl": answer_form_rows(),
    }
    files.update({f"formats/{name}": rows for name, rows in format_sample_rows().items()})
    written = []
    for name, rows in files.items():
        write_jsonl(rows, out_dir / name)
        written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for p in write_examples():
        print(p)
