"""Datasets as users have them: each common format is recognised by its content, gets a
verdict per method with the exact spec lines that make it trainable, and those lines, pasted
into a spec, validate and convert it; bad rows are shown with their values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.methods import method_definition
from tasks.data.formats import SPEAKERS, ConversionError, recognise
from tasks.data.reading import load_frame
from tasks.data.schemas import plain as _plain
from tasks.data.validate import DatasetValidationError, validate_dataset
from tests.helpers import EXAMPLES, REPO

FORMATS = EXAMPLES / "data" / "formats"

# sample -> the verdict per method, and the spec lines that make it READY where it needs them
EXPECTED = {
    "sharegpt": {"sft": ("NEEDS MAPPING", ["conversion: sharegpt"]), "dpo": ("INCOMPATIBLE", []), "grpo": ("INCOMPATIBLE", [])},
    "alpaca": {
        "sft": ("NEEDS MAPPING", ["conversion: alpaca"]),
        "dpo": ("INCOMPATIBLE", []),
        "kto": ("INCOMPATIBLE", []),
        "grpo": ("NEEDS MAPPING", ["conversion: alpaca"]),
    },
    "question_answer": {
        "sft": ("NEEDS MAPPING", ["columns: {prompt: question, completion: answer}"]),
        "grpo": ("NEEDS MAPPING", ["columns: {prompt: question}"]),
        "dpo": ("INCOMPATIBLE", []),
    },
    "hh_rlhf": {
        "dpo": ("NEEDS MAPPING", ["conversion: hh_rlhf"]),
        "orpo": ("NEEDS MAPPING", ["conversion: hh_rlhf"]),
        "kto": ("NEEDS MAPPING", ["conversion: hh_rlhf"]),
        "reward": ("NEEDS MAPPING", ["conversion: hh_rlhf"]),
        "sft": ("INCOMPATIBLE", []),
        "grpo": ("INCOMPATIBLE", []),
    },
    "ultrafeedback": {
        "dpo": ("NEEDS MAPPING", ["conversion: ultrafeedback"]),
        "orpo": ("NEEDS MAPPING", ["conversion: ultrafeedback"]),
        "kto": ("NEEDS MAPPING", ["conversion: ultrafeedback"]),
        "reward": ("NEEDS MAPPING", ["conversion: ultrafeedback"]),
        "sft": ("INCOMPATIBLE", []),
    },
    "ultrafeedback_binarized": {
        "sft": ("NEEDS MAPPING", ["columns: {messages: chosen}"]),  # not prompt + a chosen that repeats it
        "dpo": ("NEEDS MAPPING", ["conversion: repeated_prompt"]),
        "kto": ("NEEDS MAPPING", ["conversion: repeated_prompt"]),
        "reward": ("NEEDS MAPPING", ["conversion: repeated_prompt"]),
        "grpo": ("READY", []),
    },
    "kto": {
        "kto": ("READY", []),
        "dpo": ("INCOMPATIBLE", []),
        "orpo": ("INCOMPATIBLE", []),
        "reward": ("INCOMPATIBLE", []),
        "sft": ("INCOMPATIBLE", []),
        "grpo": ("READY", []),
    },
    "math_solutions": {
        "sft": ("NEEDS MAPPING", ["columns: {prompt: problem, completion: solution}"]),
        "grpo": ("NEEDS MAPPING", ["columns: {prompt: problem, answer: solution}"]),
    },
}  # fmt: skip


def _rows(name: str) -> list[dict]:
    return load_frame(str(FORMATS / f"{name}.jsonl")).map(_plain).to_dict(orient="records")


def _spec_fields(lines: list[str]) -> dict:
    """The pasted spec lines, read as YAML like any spec."""
    import yaml

    return yaml.safe_load("\n".join(lines)) or {}


@pytest.mark.parametrize("sample", EXPECTED)
def test_each_format_gets_a_verdict_per_method_with_the_lines_to_paste(sample):
    rows = _rows(sample)
    for method, (verdict, lines) in EXPECTED[sample].items():
        got = recognise(rows, method)
        assert got.verdict == verdict, (sample, method, got.text())
        if verdict == "NEEDS MAPPING":
            assert [c.spec_lines() for c in got.candidates if c.verdict == verdict][0] == lines


@pytest.mark.parametrize(
    ("sample", "method"),
    [(s, m) for s, by in EXPECTED.items() for m, (v, _) in by.items() if v == "NEEDS MAPPING"],
)
def test_the_pasted_lines_make_the_dataset_validate(sample, method, tiny_tokenizer, tmp_path):
    fields = _spec_fields(EXPECTED[sample][method][1])
    report = validate_dataset(
        str(FORMATS / f"{sample}.jsonl"),
        method_definition(method),
        tiny_tokenizer,
        512,
        tmp_path,
        columns=fields.get("columns", {}),
        conversion=fields.get("conversion"),
    )
    splits = method_definition(method).data == "unpaired" and fields.get("conversion")  # a pair makes two rows
    assert report.rows == 60 * (2 if splits else 1) and report.conversion == fields.get("conversion")
    trained = [json.loads(line) for line in Path(report.prepared_path).read_text().splitlines()]
    assert set(method_definition(method).formats[report.format]) <= set(trained[0])  # canonical columns


def test_sharegpt_round_trips_through_messages(tiny_tokenizer, tmp_path):
    report = validate_dataset(
        str(FORMATS / "sharegpt.jsonl"), method_definition("sft"), tiny_tokenizer, 512, tmp_path, conversion="sharegpt"
    )
    assert report.verdicts["sft"].startswith("sft: NEEDS MAPPING") and "conversion: sharegpt" in report.verdicts["sft"]
    converted = [json.loads(line) for line in Path(report.prepared_path).read_text().splitlines()]
    converted += [json.loads(line) for line in Path(report.heldout_path).read_text().splitlines()]
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    back = [
        {"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in r["messages"]]}
        for r in converted
    ]
    assert sorted(map(json.dumps, back)) == sorted(map(json.dumps, _rows("sharegpt")))  # held-out rows are random
    assert {"human", "gpt", "system"} <= set(SPEAKERS)


def test_hh_rlhf_and_ultrafeedback_become_the_pairs_they_hold(tiny_tokenizer, tmp_path):
    dpo = method_definition("dpo")
    hh = validate_dataset(
        str(FORMATS / "hh_rlhf.jsonl"), dpo, tiny_tokenizer, 512, tmp_path / "hh", conversion="hh_rlhf"
    )
    row = json.loads(Path(hh.prepared_path).read_text().splitlines()[0])
    original = _rows("hh_rlhf")[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"] in original["chosen"]
    assert f"\n\nAssistant: {row['chosen'][0]['content']}" in original["chosen"]
    assert f"\n\nAssistant: {row['rejected'][0]['content']}" in original["rejected"]
    uf = validate_dataset(
        str(FORMATS / "ultrafeedback.jsonl"), dpo, tiny_tokenizer, 512, tmp_path / "uf", conversion="ultrafeedback"
    )
    row = json.loads(Path(uf.prepared_path).read_text().splitlines()[0])
    source = _rows("ultrafeedback")[0]
    assert row["chosen"] == source["completions"][0]["response"]  # score 9
    assert row["rejected"] == source["completions"][1]["response"]  # score 2.5


def test_a_dataset_in_another_format_is_refused_with_the_lines_that_fix_it(tiny_tokenizer, tmp_path):
    with pytest.raises(DatasetValidationError) as raised:
        validate_dataset(str(FORMATS / "sharegpt.jsonl"), method_definition("sft"), tiny_tokenizer, 512, tmp_path)
    assert "ShareGPT conversations" in str(raised.value) and "conversion: sharegpt" in str(raised.value)


def test_bad_rows_are_shown_with_their_values(tiny_tokenizer, tmp_path):
    rows = _rows("sharegpt")
    rows[3]["conversations"][1]["from"] = "robot"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConversionError, match=r"row 4: turn 2 has from='robot'"):
        validate_dataset(str(bad), method_definition("sft"), tiny_tokenizer, 512, tmp_path, conversion="sharegpt")

    chat = [json.loads(line) for line in (EXAMPLES / "data" / "sft_chat.jsonl").read_text().splitlines()[:50]]
    chat[6]["messages"][1]["role"] = "gpt"
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps(r) + "\n" for r in chat))
    with pytest.raises(DatasetValidationError, match=r"rows 7: every turn's role .* \(row 7 has role 'gpt'"):
        validate_dataset(str(odd), method_definition("sft"), tiny_tokenizer, 512, tmp_path)


def test_inspect_answers_people_and_agents():
    out = subprocess.run(
        [sys.executable, "-m", "flows.inspect", str(FORMATS / "alpaca.jsonl"), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    payload = json.loads(out)
    assert payload["rows"] == 60
    by_method = {v["method"]: v for v in payload["verdicts"]}
    assert by_method["sft"]["verdict"] == "NEEDS MAPPING" and by_method["sft"]["spec_lines"] == [["conversion: alpaca"]]
    text = subprocess.run(
        [sys.executable, "-m", "flows.inspect", str(FORMATS / "hh_rlhf.jsonl"), "--method", "dpo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dpo: NEEDS MAPPING" in text and "conversion: hh_rlhf" in text


def test_the_report_shows_the_length_spread_and_what_truncation_cuts(tiny_tokenizer, tmp_path):
    from tasks.data.token_stats import histogram

    assert histogram([5, 10, 12, 40, 90, 100, 130, 300], 128)[4:6] == [(120, 128, 0), (128, 150, 1)]
    report = validate_dataset(
        str(FORMATS / "sharegpt.jsonl"), method_definition("sft"), tiny_tokenizer, 40, tmp_path, conversion="sharegpt"
    )
    assert sum(n for _, _, n in report.length_histogram) == report.rows
    assert report.rows_over_max_length > 0 and report.tokens_truncated >= report.rows_over_max_length


def test_the_validation_stage_draws_the_length_chart(tiny_model_path, tmp_path):
    from tasks.stages.planning import validate_dataset_task

    out = tmp_path / "run" / "data"
    report = validate_dataset_task.fn(
        str(FORMATS / "alpaca.jsonl"), method_definition("sft"), tiny_model_path, 64, out, "train", {}, None, "alpaca"
    )
    assert report.conversion == "alpaca" and (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_on_rows_that_need_a_conversion_says_what_inspect_says(tiny_tokenizer, tmp_path):
    """HH-RLHF rows have columns named like implicit preference pairs; both doors name the conversion."""
    dpo = method_definition("dpo")
    with pytest.raises(DatasetValidationError) as refused:
        validate_dataset(str(FORMATS / "hh_rlhf.jsonl"), dpo, tiny_tokenizer, 512, tmp_path / "hh")
    inspected = recognise(_rows("hh_rlhf"), "dpo")
    assert inspected.verdict == "NEEDS MAPPING" and inspected.text() in str(refused.value)
    assert "conversion: hh_rlhf" in str(refused.value) and "bad row" not in str(refused.value)
    assert not (tmp_path / "hh" / "train.jsonl").exists()
    with pytest.raises(DatasetValidationError) as for_orpo:  # every pair method, the same answer
        validate_dataset(str(FORMATS / "hh_rlhf.jsonl"), method_definition("orpo"), tiny_tokenizer, 512, tmp_path)
    assert recognise(_rows("hh_rlhf"), "orpo").text() in str(for_orpo.value)
