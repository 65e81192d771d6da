"""Validation at scale: the data streams through in blocks with bounded memory, checked in
worker processes, and every bad row is still located by its line; Hub datasets are streamed."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.data.reading as reading
import tasks.data.validate as validate
from tasks.core.methods import SFT
from tasks.data.reading import DatasetLoadError, LineBlock, iter_blocks
from tasks.data.token_stats import Reservoir
from tasks.data.validate import DatasetValidationError, validate_dataset
from training.example_data import chat_rows_at_scale, write_jsonl_stream


def _chat(i: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]
    }


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 4 KB (about 40 rows), so a few hundred rows make many blocks."""
    monkeypatch.setattr(reading, "CHUNK_BYTES", 4096)


def test_jsonl_blocks_hold_whole_lines_numbered_as_in_the_file(small_blocks, tmp_path):
    path = tmp_path / "d.jsonl"
    text = "".join(json.dumps(_chat(i)) + "\n" + ("\n" if i % 7 == 0 else "") for i in range(300))
    path.write_text(text)
    blocks = list(iter_blocks(str(path)))
    assert len(blocks) > 5 and all(isinstance(b, LineBlock) for b in blocks)
    assert b"\n".join(b.data for b in blocks) + b"\n" == path.read_bytes()
    assert [b.first for b in blocks][:1] == [1]
    for b, nxt in zip(blocks, blocks[1:], strict=False):
        assert nxt.first == b.first + b.data.count(b"\n") + 1


@pytest.mark.parametrize("workers", ["0", "2"])
def test_many_blocks_give_the_same_report_and_files_as_one(
    small_blocks, tiny_tokenizer, tmp_path, monkeypatch, workers
):
    path = tmp_path / "chat.jsonl"
    write_jsonl_stream(chat_rows_at_scale(600, seed=3), path)
    with path.open("a") as f:  # two duplicates across blocks
        f.write(path.read_text().splitlines()[5] + "\n" + path.read_text().splitlines()[400] + "\n")
    monkeypatch.setenv("FINETUNE_VALIDATE_WORKERS", workers)
    report = validate_dataset(str(path), SFT, tiny_tokenizer, 64, tmp_path / "out")

    monkeypatch.setattr(reading, "CHUNK_BYTES", 1 << 30)  # the whole file in one block
    whole = validate_dataset(str(path), SFT, tiny_tokenizer, 64, tmp_path / "whole")
    assert report.rows == whole.rows == 602 and report.duplicates == whole.duplicates == 2
    assert report.tokens == whole.tokens and report.length_histogram == whole.length_histogram
    assert report.role_anomalies == whole.role_anomalies and report.empty_turns == whole.empty_turns
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert report.train_rows == 602 - 30 and len((tmp_path / "out" / "heldout.jsonl").read_text().splitlines()) == 30


@pytest.mark.parametrize("workers", ["0", "2"])
def test_every_bad_row_in_every_block_is_counted_and_the_first_ones_shown(
    small_blocks, tiny_tokenizer, tmp_path, monkeypatch, workers
):
    rows = [_chat(i) for i in range(400)]
    for i in range(50, 400, 25):  # 14 rows with an unknown role, spread over many blocks
        rows[i]["messages"][1]["role"] = "gpt"
    rows[310]["messages"] = []
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FINETUNE_VALIDATE_WORKERS", workers)
    with pytest.raises(DatasetValidationError) as e:
        validate_dataset(str(path), SFT, tiny_tokenizer, 64, tmp_path / "out")
    msg = str(e.value)
    assert "15 bad row(s)" in msg
    assert "rows 51, 76, 101, 126, 151, 176, 201, 226, 251, 276 and 4 more: every turn's role" in msg
    assert "(row 51 has role 'gpt'" in msg
    assert "rows 311: must be a non-empty list of turns" in msg
    assert not (tmp_path / "out" / "train.jsonl").exists() and not list((tmp_path / "out").glob("*.tmp"))


def test_unreadable_lines_anywhere_in_a_large_file_are_all_named(small_blocks, tiny_tokenizer, tmp_path):
    lines = [json.dumps(_chat(i)) for i in range(300)]
    lines[10], lines[250] = '{"messages": [', "[1, 2]"
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLoadError) as e:
        validate_dataset(str(path), SFT, tiny_tokenizer, 64, tmp_path / "out")
    assert "2 unreadable line(s)" in str(e.value)
    assert "line 11: not valid JSON" in str(e.value) and "line 251: expected a JSON object, got list" in str(e.value)


def test_token_statistics_of_a_large_dataset_come_from_a_stated_uniform_sample(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "MAX_TOKENIZED_ROWS", 100)
    path = tmp_path / "chat.jsonl"
    write_jsonl_stream(chat_rows_at_scale(1000, seed=5, spread="realistic"), path)
    report = validate_dataset(str(path), SFT, tiny_tokenizer, 128, tmp_path / "out")
    assert report.token_rows_measured == 100 and report.rows == 1000
    assert any("uniform sample of 100 of 1000 rows" in w for w in report.warnings)
    assert sum(n for _, _, n in report.length_histogram) == pytest.approx(1000, abs=10)  # scaled to all rows
    monkeypatch.setattr(validate, "MAX_TOKENIZED_ROWS", 10_000)
    full = validate_dataset(str(path), SFT, tiny_tokenizer, 128, tmp_path / "full")
    assert full.token_rows_measured == 1000
    assert report.tokens.mean == pytest.approx(full.tokens.mean, rel=0.15)
    assert report.rows_over_max_length == pytest.approx(full.rows_over_max_length, rel=0.5, abs=20)


def test_the_sample_is_uniform_seeded_and_independent_of_block_sizes():
    def sample(block: int) -> list[int]:
        r = Reservoir(500, seed=0)
        for start in range(0, 20_000, block):
            r.offer(list(range(start, min(start + block, 20_000))))
        return r.items

    assert sample(1000) == sample(1000) == sample(7) and len(set(sample(1000))) == 500
    quarters = [sum(1 for x in sample(1000) if q * 5000 <= x < (q + 1) * 5000) for q in range(4)]
    assert all(90 < n < 160 for n in quarters)  # 125 expected in each quarter


def test_conversations_that_end_with_a_user_turn_or_use_tools_are_reported(tiny_tokenizer, tmp_path):
    rows = [_chat(i) for i in range(10)]
    rows[2]["messages"].append({"role": "user", "content": "thanks"})
    rows[4]["messages"][1:1] = [
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "go on"},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_dataset(str(path), SFT, tiny_tokenizer, 128, tmp_path / "out")
    assert report.role_anomalies == {
        "messages ends with a user turn (it is not trained on)": 1,
        "messages has tool turns": 1,
    }


def test_parquet_and_csv_are_read_in_blocks_of_rows(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK_ROWS", 50)
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(200)]
    rows[120]["completion"] = " "
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=30)
    assert len(list(iter_blocks(str(tmp_path / "d.parquet")))) == 4
    with pytest.raises(DatasetValidationError, match=r"column 'completion', rows 121: completion must not be empty"):
        validate_dataset(str(tmp_path / "d.parquet"), SFT, tiny_tokenizer, 64, tmp_path / "out")
    import pandas as pd

    pd.DataFrame(rows[:100]).to_csv(tmp_path / "d.csv", index=False)
    assert [len(b) for b in iter_blocks(str(tmp_path / "d.csv"))] == [50, 50]
    assert list(next(iter(iter_blocks(str(tmp_path / "d.csv")))).index[:2]) == [1, 2]


def _hub_dataset(repo: str, name: str, data: bytes) -> None:
    from tasks.core.hub_access import make_api
    from tests.jobs_standin import STANDIN_TOKEN

    api = make_api(STANDIN_TOKEN)
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=repo, repo_type="dataset")


def test_a_hub_dataset_is_streamed_and_checked_row_by_row(jobs_env, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK_ROWS", 100)
    rows = [_chat(i) for i in range(500)]
    rows[333]["messages"][0]["role"] = "human"
    _hub_dataset("standin-user/stream-jsonl", "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    with pytest.raises(DatasetValidationError, match=r"rows 334: every turn's role .*row 334 has role 'human'"):
        validate_dataset("standin-user/stream-jsonl", SFT, tiny_tokenizer, 64, tmp_path / "bad")

    del rows[333]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=64)
    _hub_dataset("standin-user/stream-parquet", "data/train-00000-of-00001.parquet", buf.getvalue())
    report = validate_dataset("standin-user/stream-parquet", SFT, tiny_tokenizer, 64, tmp_path / "ok")
    assert report.rows == 499
    first = json.loads((tmp_path / "ok" / "train.jsonl").read_text().splitlines()[0])
    assert first == rows[0]  # numpy arrays from Parquet come back as plain lists
    assert jobs_env.counts["resolve_get"] >= 1 and not jobs_env.counts.get("unknown")


def test_a_transient_hub_failure_mid_stream_is_retried(jobs_env, tiny_tokenizer, tmp_path, monkeypatch):
    import time
    import types

    from huggingface_hub.utils import _http

    slept: list[float] = []
    fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake.sleep = slept.append
    monkeypatch.setattr(_http, "time", fake)
    _hub_dataset(
        "standin-user/stream-flaky", "train.jsonl", "".join(json.dumps(_chat(i)) + "\n" for i in range(50)).encode()
    )
    jobs_env.fail_next("GET /datasets/standin-user/stream-flaky/resolve/", status=503, times=1)
    report = validate_dataset("standin-user/stream-flaky", SFT, tiny_tokenizer, 64, tmp_path / "out")
    assert report.rows == 50 and slept  # huggingface_hub's backoff waited, then the read went through


class _DiesWhenUnpickled(str):
    """A dataset path that kills the worker process it is sent to (unpickling it exits), as an
    out-of-memory kill would; in this process it is an ordinary path."""

    def __reduce__(self):
        import os

        return (os._exit, (1,))


def test_blocks_of_a_killed_worker_are_checked_here_and_nothing_is_lost(
    small_blocks, tiny_tokenizer, tmp_path, monkeypatch, caplog
):
    path = tmp_path / "chat.jsonl"
    write_jsonl_stream(chat_rows_at_scale(400, seed=9), path)
    monkeypatch.setenv("FINETUNE_VALIDATE_WORKERS", "2")
    report = validate_dataset(_DiesWhenUnpickled(path), SFT, tiny_tokenizer, 64, tmp_path / "out")
    assert report.rows == 400 and "validation workers stopped" in caplog.text
    monkeypatch.setenv("FINETUNE_VALIDATE_WORKERS", "0")
    validate_dataset(str(path), SFT, tiny_tokenizer, 64, tmp_path / "inline")
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == (tmp_path / "inline" / "train.jsonl").read_bytes()


def test_a_byte_order_mark_at_the_start_of_a_jsonl_file_is_not_a_bad_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(_chat(i)) + "\r\n" for i in range(5)).encode())
    assert validate_dataset(str(path), SFT, tiny_tokenizer, 64, tmp_path / "out").rows == 5
