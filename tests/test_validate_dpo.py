"""Preference data for DPO: the shipped pairs pass; mistakes that would waste a run fail,
naming rows and columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.methods import DPO
from tasks.data.validate import DatasetValidationError, validate_dataset
from tests.helpers import EXAMPLES


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _pair(a: int = 1, chosen: str | None = None, rejected: str = "I am not sure.") -> dict:
    return {
        "prompt": [_turn("user", f"What is {a} + 1?")],
        "chosen": [_turn("assistant", chosen or f"{a} + 1 = {a + 1}")],
        "rejected": [_turn("assistant", rejected)],
    }


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _validate(src: str, tok, tmp_path: Path, max_length: int = 64):
    return validate_dataset(src, DPO, tok, max_length, tmp_path / "out")


def test_the_shipped_pairs_pass(tiny_tokenizer, tmp_path):
    report = _validate(str(EXAMPLES / "data" / "dpo_pairs.jsonl"), tiny_tokenizer, tmp_path)
    assert report.format == "preference" and report.rows == 300 and report.duplicates == 0
    assert report.tokens.max < 64 and report.rows_over_max_length == 0


def test_plain_text_pairs_and_implicit_prompt_conversations_pass(tiny_tokenizer, tmp_path):
    text = [{"prompt": "Add 2 and 3.", "chosen": " 5", "rejected": " maybe 6"}]
    assert _validate(_write(tmp_path / "t.jsonl", text), tiny_tokenizer, tmp_path).format == "preference"
    implicit = [
        {
            "chosen": [_turn("user", "What is 2 + 3?"), _turn("assistant", "2 + 3 = 5")],
            "rejected": [_turn("user", "What is 2 + 3?"), _turn("assistant", "Perhaps 6?")],
        }
    ]
    report = _validate(_write(tmp_path / "i.jsonl", implicit), tiny_tokenizer, tmp_path)
    assert report.format == "implicit_preference"


def test_pairs_that_would_waste_a_run_are_named(tiny_tokenizer, tmp_path):
    rows = [
        _pair(1),
        _pair(2, chosen="same", rejected="same"),  # 2: identical sides
        {**_pair(3), "rejected": [_turn("assistant", "  ")]},  # 3: empty side
        {**_pair(4), "prompt": ""},  # 4: empty prompt
        {**_pair(5), "chosen": "5 + 1 = 6"},  # 5: text beside turns
        {**_pair(6), "chosen": [_turn("user", "again?")]},  # 6: user after user
    ]
    with pytest.raises(DatasetValidationError) as e:
        _validate(_write(tmp_path / "bad.jsonl", rows), tiny_tokenizer, tmp_path)
    msg = str(e.value)
    assert "columns prompt+chosen+rejected, rows 2: chosen and rejected are identical" in msg
    assert "column 'rejected', rows 3: rejected: every user and assistant turn needs text" in msg
    assert "column 'prompt', rows 4: prompt must not be empty" in msg
    # row 4's empty prompt is text beside turns, and leaves the answer without a user turn
    assert "columns prompt+chosen+rejected, rows 4, 5: prompt, chosen and rejected must all be text or all be" in msg
    assert "columns prompt+chosen+rejected, rows 4, 6: prompt + answer turns break the role order" in msg
    assert "rows 1" not in msg


def test_a_missing_prompt_needs_conversations_with_a_shared_prefix(tiny_tokenizer, tmp_path):
    rows = [{"chosen": "5", "rejected": "6"}]
    with pytest.raises(DatasetValidationError, match="rows 1: without a prompt column, chosen and rejected must be"):
        _validate(_write(tmp_path / "p.jsonl", rows), tiny_tokenizer, tmp_path)
    differ_from_start = [
        {
            "chosen": [_turn("user", "a"), _turn("assistant", "b")],
            "rejected": [_turn("user", "c"), _turn("assistant", "d")],
        }
    ]
    with pytest.raises(DatasetValidationError, match="share their leading turns"):
        _validate(_write(tmp_path / "q.jsonl", differ_from_start), tiny_tokenizer, tmp_path)


def test_length_problems_are_caught_before_paying(tiny_tokenizer, tmp_path):
    long_answer = _pair(1, chosen="word " * 100)
    report = _validate(_write(tmp_path / "l.jsonl", [long_answer, _pair(2)]), tiny_tokenizer, tmp_path)
    assert report.rows_over_max_length == 1
    assert any("have a side that exceeds max_length=64" in w for w in report.warnings)
    long_prompt = {**_pair(3), "prompt": [_turn("user", "word " * 100)]}
    with pytest.raises(DatasetValidationError, match="rows 2: the prompt alone fills max_length=64"):
        _validate(_write(tmp_path / "lp.jsonl", [_pair(1), long_prompt]), tiny_tokenizer, tmp_path)
