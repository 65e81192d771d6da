"""Dataset validation: good data gives a report, bad data fails naming rows and columns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.core.methods import SFT
from tasks.data.reading import DatasetLoadError
from tasks.data.validate import DatasetValidationError, validate_dataset
from tests.helpers import EXAMPLES


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _chat(user: str = "What is 1 + 1?", answer: str = "1 + 1 = 2") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _validate(source: str, tok, tmp_path: Path, **kw):
    return validate_dataset(source, SFT, tok, kw.pop("max_length", 128), tmp_path / "out", **kw)


def test_the_shipped_chat_data_passes_with_a_full_report(tiny_tokenizer, tmp_path):
    report = _validate(str(EXAMPLES / "data" / "sft_chat.jsonl"), tiny_tokenizer, tmp_path)
    assert report.format == "messages" and report.rows == 400
    assert report.duplicates == 0 and report.empty_turns == 0 and report.rows_over_max_length == 0
    assert 10 < report.tokens.min <= report.tokens.mean <= report.tokens.max < 128
    prepared = Path(report.prepared_path).read_text().splitlines()
    assert len(prepared) == report.train_rows == 380 and json.loads(prepared[0]).keys() == {"messages"}
    assert len(Path(report.heldout_path).read_text().splitlines()) == report.heldout_rows == 20  # 5%, at random


def test_prompt_completion_and_text_formats_are_detected(tiny_tokenizer, tmp_path):
    pc = _validate(str(EXAMPLES / "data" / "sft_prompt_completion.jsonl"), tiny_tokenizer, tmp_path)
    assert pc.format == "prompt_completion" and pc.columns == ["prompt", "completion"]
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "hello there"}, {"text": "general kenobi"}])
    assert _validate(text, tiny_tokenizer, tmp_path).format == "text"


def test_token_lengths_are_measured_with_the_chat_template(tiny_tokenizer, tmp_path):
    src = _jsonl(tmp_path / "one.jsonl", [_chat()])
    report = _validate(src, tiny_tokenizer, tmp_path)
    expected = len(
        tiny_tokenizer.apply_chat_template(_chat()["messages"], tokenize=True, return_dict=True)["input_ids"]
    )
    assert report.tokens.max == expected


def test_broken_rows_are_named_by_row_and_column(tiny_tokenizer, tmp_path):
    rows = [
        _chat(),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # line 2
        _chat(),
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # line 4
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},  # line 5
        {"messages": []},  # line 6
        {"messages": None},  # line 7
    ]
    with pytest.raises(DatasetValidationError) as e:
        _validate(_jsonl(tmp_path / "bad.jsonl", rows), tiny_tokenizer, tmp_path)
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    assert "column 'messages', rows 2: every user and assistant turn needs non-empty text content" in msg
    assert "rows 4: every turn's role must be one of" in msg
    assert "rows 5: turns must go" in msg
    assert "rows 6: must be a non-empty list of turns" in msg
    assert "rows 7: must not be missing" in msg
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing half-written


def test_unreadable_json_lines_are_named_by_line(tiny_tokenizer, tmp_path):
    src = _jsonl(tmp_path / "broken.jsonl", [_chat(), '{"messages": [', _chat(), "[1, 2]"])
    with pytest.raises(DatasetLoadError) as e:
        _validate(src, tiny_tokenizer, tmp_path)
    assert "line 2: not valid JSON" in str(e.value) and "line 4: expected a JSON object" in str(e.value)


def test_an_unknown_layout_says_which_formats_and_how_to_map(tiny_tokenizer, tmp_path):
    src = _jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DatasetValidationError) as e:
        _validate(src, tiny_tokenizer, tmp_path)
    msg = str(e.value)
    assert "[question, answer]" in msg and "messages | prompt+completion | text" in msg and "columns:" in msg


def test_column_mapping_renames_onto_canonical_columns(tiny_tokenizer, tmp_path):
    src = _jsonl(tmp_path / "q.jsonl", [{"question": "What is 2 + 2?", "answer": " 4", "id": 1}])
    report = _validate(src, tiny_tokenizer, tmp_path, columns={"prompt": "question", "completion": "answer"})
    assert report.format == "prompt_completion"
    assert any("left out: id" in w for w in report.warnings)
    with pytest.raises(DatasetValidationError, match="'completion: reply' names a column the dataset lacks"):
        _validate(src, tiny_tokenizer, tmp_path, columns={"completion": "reply"})
    with pytest.raises(DatasetValidationError, match="'answer' is not a sft column"):
        _validate(src, tiny_tokenizer, tmp_path, columns={"answer": "question"})


def test_csv_rows_are_numbered_from_one(tiny_tokenizer, tmp_path):
    csv = tmp_path / "d.csv"
    pd.DataFrame({"prompt": ["a", "", "c"], "completion": ["x", "y", ""]}).to_csv(csv, index=False)
    with pytest.raises(DatasetValidationError) as e:
        _validate(str(csv), tiny_tokenizer, tmp_path)
    assert "column 'prompt', rows 2: prompt must not be empty" in str(e.value)
    assert "column 'completion', rows 3: completion must not be empty" in str(e.value)


def test_parquet_list_columns_are_read(tiny_tokenizer, tmp_path):
    pq = tmp_path / "d.parquet"
    pd.DataFrame([_chat(), _chat("What is 2 + 2?", "2 + 2 = 4")]).to_parquet(pq)
    assert _validate(str(pq), tiny_tokenizer, tmp_path).rows == 2


def test_duplicates_long_rows_and_empty_system_turns_are_counted(tiny_tokenizer, tmp_path):
    long = _chat(user="word " * 200)
    sys_empty = {"messages": [{"role": "system", "content": ""}, *_chat()["messages"]]}
    src = _jsonl(tmp_path / "d.jsonl", [_chat(), _chat(), long, sys_empty])
    report = _validate(src, tiny_tokenizer, tmp_path, max_length=64)
    assert report.duplicates == 1 and report.rows_over_max_length == 1 and report.empty_turns == 1
    assert len(report.warnings) == 3


def test_missing_and_empty_datasets(tiny_tokenizer, tmp_path):
    with pytest.raises(DatasetLoadError, match="was not found"):
        _validate(str(tmp_path / "nope.jsonl"), tiny_tokenizer, tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetValidationError, match="no rows"):
        _validate(str(empty), tiny_tokenizer, tmp_path)
