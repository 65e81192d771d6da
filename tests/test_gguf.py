"""GGUF: checks before conversion, the tokenizer family rule, conversion, quantization and
the smoke test, on the tiny model with llama.cpp's real converter."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tasks.core.model_source import load_config
from tasks.core.models import GgufFile, JobResult
from tasks.core.spec import Outputs
from tasks.export.gguf import (
    GgufError,
    check_quant_types,
    config_row_sizes,
    convert_gguf,
    converter_chktxt,
    hash_registrations,
    tokenizer_chkhsh,
    tokenizer_family,
    weight_row_sizes,
)
from tasks.export.gguf_converter import find_converter
from tasks.export.gguf_smoke import SmokeCheck, default_thresholds, smoke_test_all, smoke_test_in_children


def test_rows_that_cannot_take_a_k_quant_are_named_in_the_plan_and_refused_only_when_strict(tiny_model_path):
    from transformers import Qwen2Config

    assert set(config_row_sizes(load_config(tiny_model_path)).values()) == {256, 512}
    assert check_quant_types(weight_row_sizes(Path(tiny_model_path)), ["f16", "q8_0", "q5_k_m", "q4_k_m"]) == []
    odd = Qwen2Config(
        hidden_size=320,
        intermediate_size=640,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    notes = check_quant_types(config_row_sizes(odd), ["q8_0", "q4_k_m"])
    assert len(notes) == 1 and notes[0].startswith("gguf q4_k_m: ") and "not a multiple of 256" in notes[0]
    with pytest.raises(GgufError) as e:
        check_quant_types(config_row_sizes(odd), ["q8_0", "q4_k_m"], strict=True)
    msg = str(e.value)
    assert "gguf type q4_k_m needs every weight row to be a multiple of 256" in msg
    assert "rows of 320" in msg and "without fallback: f16, bf16, q8_0, q4_0" in msg


def test_the_tiny_tokenizer_is_exactly_qwen2s_pipeline_and_nothing_else_is(tiny_model_path, tmp_path):
    assert tokenizer_family(Path(tiny_model_path)) == "qwen2"
    other = tmp_path / "other"
    shutil.copytree(tiny_model_path, other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (other / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_family(other) is None
    assert hash_registrations(other, find_converter()) == {}  # never mislabelled


def test_the_registered_hash_is_the_converters_own(tiny_model_path):
    converter = find_converter()
    chktxt = converter_chktxt(converter)
    assert len(chktxt) > 100 and "\n" in chktxt
    regs = hash_registrations(Path(tiny_model_path), converter)
    assert regs == {tokenizer_chkhsh(Path(tiny_model_path), chktxt): "qwen2"}


def test_an_unrecognised_tokenizer_is_rejected_by_the_converter(tiny_model_path, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(tiny_model_path, other)
    data = json.loads((other / "tokenizer.json").read_text())
    data["normalizer"] = None  # no longer exactly Qwen2's: no registration
    (other / "tokenizer.json").write_text(json.dumps(data))
    result = JobResult(model_dir=str(other), adapter_dir=None, files=[], size_mb=0, train_metrics={})
    with pytest.raises(GgufError, match="pre-tokenizer was not recognized"):
        convert_gguf(result, Outputs(gguf=["f16"]), tmp_path / "run", "x")
    assert not list((tmp_path / "run" / "gguf").glob("*.gguf*"))  # no half-written file


def test_convert_quantize_and_smoke_test_every_type(tiny_model_path, tmp_path):
    from gguf import GGUFReader

    result = JobResult(model_dir=tiny_model_path, adapter_dir=None, files=[], size_mb=0, train_metrics={})
    gguf = convert_gguf(result, Outputs(gguf=["q4_k_m", "q8_0", "f16"]), tmp_path, "tiny")
    assert [f.quant for f in gguf.files] == ["q4_k_m", "q8_0", "f16"]
    sizes = {f.quant: f.size_mb for f in gguf.files}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    reader = GGUFReader(gguf.files[2].path)
    fields = {k: v for k, v in reader.fields.items()}
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "<|im_start|>" in template
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 2
    modelfile = Path(gguf.modelfile).read_text()
    assert modelfile.startswith("FROM ./tiny-q4_k_m.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a} + 2?"},
                        {"role": "assistant", "content": f"{a} + 2 = {a + 2}"},
                    ]
                }
            )
            + "\n"
            for a in range(4)
        )
    )
    tested = smoke_test_all(gguf, Path(tiny_model_path), rows, rows)
    for f in tested.files:
        assert f.tokenization_matches == f.tokenization_checked == 14, f.problems
        assert f.perplexity is not None and f.hf_perplexity is not None and f.generation_tokens_per_s
        assert len(f.sha256) == 64
    f16 = next(f for f in tested.files if f.quant == "f16")
    assert f16.passed and f16.top1_agreement >= 0.98
    assert f16.perplexity == pytest.approx(f16.hf_perplexity, rel=0.01)


def test_a_fallback_in_llama_cpp_is_recorded_per_file_and_refused_when_strict(tiny_model_path, tmp_path):
    """llama.cpp quantizes rows of 320 to q4_K by falling back to q5_0 and still returns 0."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tasks.export.gguf import convert_to_gguf, quantize

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    config = Qwen2Config(
        hidden_size=320,
        intermediate_size=640,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "odd"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    base = tmp_path / "odd-f16.gguf"
    convert_to_gguf(model_dir, base, "f16", tmp_path / "convert.log")
    with pytest.raises(GgufError, match="fell back to another type"):
        quantize(base, tmp_path / "odd-q4_k_m.gguf", "q4_k_m", strict=True)
    assert not (tmp_path / "odd-q4_k_m.gguf").exists()
    # by default the rows fall back the way llama.cpp does, and the file says which and how many
    _, (count, total, kinds) = quantize(base, tmp_path / "odd-q4_k_m.gguf", "q4_k_m")
    assert (tmp_path / "odd-q4_k_m.gguf").stat().st_size > 0
    assert count > 0 and total is not None and count <= total and sum(kinds.values()) == count
    assert all(k.startswith(("q4_K ->", "q6_K ->")) for k in kinds), kinds
    _, (count, _, _) = quantize(base, tmp_path / "odd-q8_0.gguf", "q8_0")  # 320 is a multiple of 32: fine
    assert count == 0 and (tmp_path / "odd-q8_0.gguf").stat().st_size > 0


def test_half_written_files_of_a_killed_flow_are_cleared_and_never_shared(tmp_path):
    from tasks.export.gguf import _remove_orphaned_partials

    out = tmp_path / "gguf"
    out.mkdir()
    dead = out / "run-q8_0.gguf.999999999.partial"  # a writer that no longer exists
    live = out / f"run-q8_0.gguf.{os.getpid()}.partial"  # a writer still at work
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    _remove_orphaned_partials(out)
    assert not dead.exists() and live.exists()


def _child_that_crashes_on(crashing: str, calls: list[list[str]]):
    """Stands in for the smoke test's child process: it measures the files in order and dies
    of SIGSEGV on `crashing`, as llama.cpp does on a CPU path it gets wrong."""
    import subprocess

    def run(cmd: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        files = json.loads(cmd[-1])
        calls.append([f["quant"] for f in files])
        for file in files:
            if file["quant"] == crashing:
                return subprocess.CompletedProcess(cmd, -11, "", "Segmentation fault")
            measured = GgufFile(quant=file["quant"], path=file["path"], size_mb=0.0, sha256="0" * 64, passed=True)
            Path(file["path"]).with_suffix(".smoke.json").write_text(measured.model_dump_json())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_one_child_tests_every_file_and_a_crash_fails_only_the_file_it_was_on(tmp_path):
    checks = [SmokeCheck(tmp_path / f"tiny-{q}.gguf", q, default_thresholds(q)) for q in ("f16", "q8_0", "q4_k_m")]
    for check in checks:
        check.path.write_bytes(b"GGUF")
    calls: list[list[str]] = []
    crashing = _child_that_crashes_on("q8_0", calls)
    results = smoke_test_in_children(checks, tmp_path / "reference.json", run=crashing)
    # tried once more alone at the head of a new child, then the files after it go on without it
    assert calls == [["f16", "q8_0", "q4_k_m"], ["q8_0", "q4_k_m"], ["q4_k_m"]]
    assert [(r.quant, r.passed) for r in results] == [("f16", True), ("q8_0", False), ("q4_k_m", True)]
    assert results[1].problems == ["the smoke test process died (signal 11): Segmentation fault"]


def test_an_ordinary_error_in_the_child_fails_the_files_left_without_retrying(tmp_path):
    import subprocess

    checks = [SmokeCheck(tmp_path / f"tiny-{q}.gguf", q, default_thresholds(q)) for q in ("f16", "q8_0")]
    for check in checks:
        check.path.write_bytes(b"GGUF")
    calls: list[list[str]] = []

    def broken(cmd: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ModuleNotFoundError: No module named 'llama_cpp'")

    results = smoke_test_in_children(checks, tmp_path / "reference.json", run=broken)
    assert len(calls) == 1 and not any(r.passed for r in results)
    assert all("died (exit code 1): ModuleNotFoundError" in r.problems[0] for r in results)
