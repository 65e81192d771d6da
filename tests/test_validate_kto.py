"""Unpaired data for KTO, and pairs for ORPO: the shipped rows pass; pairs become two labelled
rows; mistakes that would waste a run fail before anything is spent, naming rows and columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.planning import plan_run
from tasks.core.methods import DPO, KTO, ORPO
from tasks.core.spec import SpecError, load_spec
from tasks.data.validate import DatasetValidationError, validate_dataset
from tests.helpers import EXAMPLES


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _row(a: int, label: object, answer: str | None = None) -> dict:
    return {
        "prompt": [_turn("user", f"What is {a} + 1?")],
        "completion": [_turn("assistant", answer or f"{a} + 1 = {a + 1}")],
        "label": label,
    }


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows_written(report) -> list[dict]:
    return [json.loads(line) for line in Path(report.prepared_path).read_text().splitlines()]


def test_the_shipped_rows_pass_with_both_labels(tiny_tokenizer, tmp_path):
    report = validate_dataset(str(EXAMPLES / "data" / "kto_rows.jsonl"), KTO, tiny_tokenizer, 64, tmp_path)
    assert report.format == "unpaired" and report.rows == 300
    assert {r["label"] for r in _rows_written(report)} == {True, False}


def test_labels_that_are_not_booleans_are_named_by_row(tiny_tokenizer, tmp_path):
    rows = [_row(i, i % 2 == 0) for i in range(10)]
    rows[3]["label"], rows[7]["label"] = 1, "good"
    with pytest.raises(DatasetValidationError) as refused:
        validate_dataset(_write(tmp_path / "d.jsonl", rows), KTO, tiny_tokenizer, 64, tmp_path / "out")
    message = str(refused.value)
    assert "label must be true (a desirable answer) or false" in message and "4" in message and "8" in message
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing half-written


def test_a_set_of_one_label_is_refused_with_what_to_add(tiny_tokenizer, tmp_path):
    rows = [_row(i, True) for i in range(10)]
    with pytest.raises(
        DatasetValidationError, match=r"every one of the 10 rows has label true .* Add rows labelled false"
    ):
        validate_dataset(_write(tmp_path / "d.jsonl", rows), KTO, tiny_tokenizer, 64, tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_pairs_become_a_desirable_and_an_undesirable_row(tiny_tokenizer, tmp_path):
    """`conversion: unpair` (what flows.inspect offers for pairs): the chosen answer labelled true,
    the rejected false, the same prompt; a pair given as two conversations is cut at their shared turns."""
    explicit = str(EXAMPLES / "data" / "dpo_pairs.jsonl")
    report = validate_dataset(explicit, KTO, tiny_tokenizer, 64, tmp_path / "a", conversion="unpair")
    written = _rows_written(report)
    desirable = sum(r["label"] for r in written)  # half of them, less those held out for evaluation
    assert report.rows == 600 and abs(2 * desirable - len(written)) <= report.heldout_rows
    implicit = {
        "chosen": [_turn("user", "What is 2 + 2?"), _turn("assistant", "2 + 2 = 4")],
        "rejected": [_turn("user", "What is 2 + 2?"), _turn("assistant", "Maybe 5.")],
    }
    report = validate_dataset(
        _write(tmp_path / "i.jsonl", [implicit] * 4), KTO, tiny_tokenizer, 64, tmp_path / "b", conversion="unpair"
    )
    first = _rows_written(report)[0]
    assert first["prompt"] == [_turn("user", "What is 2 + 2?")] and first["completion"] == [
        _turn("assistant", "2 + 2 = 4")
    ]


def test_unpaired_rows_given_to_a_pair_method_say_why_no_conversion_helps(tiny_tokenizer, tmp_path):
    for method in (DPO, ORPO):
        with pytest.raises(DatasetValidationError, match="pairing them would invent preferences"):
            validate_dataset(str(EXAMPLES / "data" / "kto_rows.jsonl"), method, tiny_tokenizer, 64, tmp_path / "o")


def test_orpo_pairs_with_identical_or_empty_sides_are_named_by_row(tiny_tokenizer, tmp_path):
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "dpo_pairs.jsonl").read_text().splitlines()[:6]]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[4]["chosen"] = ""
    with pytest.raises(DatasetValidationError) as refused:
        validate_dataset(_write(tmp_path / "p.jsonl", rows), ORPO, tiny_tokenizer, 64, tmp_path / "out")
    message = str(refused.value)
    assert "chosen and rejected are identical" in message and "chosen must not be empty" in message


def test_kto_refuses_a_micro_batch_of_one_before_anything_is_spent(tmp_path):
    spec = load_spec(EXAMPLES / "kto-tiny.yaml", {"training": {"per_device_train_batch_size": 1}})
    with pytest.raises(SpecError, match="kto needs at least 2 rows per micro-batch"):
        plan_run(spec, tmp_path)
