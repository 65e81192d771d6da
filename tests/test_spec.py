"""The run spec: YAML or parameters in, a validated RunSpec out, or an error naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cli.run import parse_args
from tasks.core.methods import METHODS
from tasks.core.spec import RunSpec, SpecError, load_spec, parse_spec
from tests.helpers import EXAMPLES


def test_the_shipped_example_spec_loads_with_its_dataset_resolved():
    spec = load_spec(EXAMPLES / "sft-tiny.yaml")
    assert spec.method == "sft" and spec.model == "tiny"
    assert Path(spec.dataset).is_file()
    assert spec.training["max_length"] == 128


def test_defaults_match_the_design():
    spec = parse_spec({"dataset": "x.jsonl"})
    assert (spec.method, spec.hardware, spec.backend) == ("sft", "auto", "local")
    assert spec.lora.enabled == "auto"
    assert spec.budget.max_usd == 20 and spec.budget.auto_approve_usd == 2
    assert spec.outputs.private is True and spec.outputs.hub_repo is None


def test_a_bad_choice_names_the_field_and_the_allowed_values():
    with pytest.raises(SpecError) as e:
        parse_spec({"dataset": "x.jsonl", "method": "sftt", "backend": "slurm"})
    msg = str(e.value)
    assert (
        "field 'method'" in msg
        and ", ".join(f"'{m}'" for m in list(METHODS)[:-1]) + f" or '{list(METHODS)[-1]}'" in msg
        and "'sftt'" in msg
    )
    assert "field 'backend'" in msg and "'hf-jobs'" in msg


def test_an_unknown_field_lists_the_fields_allowed_there():
    with pytest.raises(SpecError, match=r"unknown field 'budget.max_dollars'.*max_usd, auto_approve_usd"):
        parse_spec({"dataset": "x.jsonl", "budget": {"max_dollars": 3}})
    with pytest.raises(SpecError, match=r"unknown field 'datset'.*dataset"):
        parse_spec({"datset": "x.jsonl"})


def test_missing_dataset_is_named():
    with pytest.raises(SpecError, match="field 'dataset': Field required"):
        parse_spec({"method": "sft"})


def test_auto_approve_above_max_is_refused():
    with pytest.raises(SpecError, match="auto_approve_usd .* is above max_usd"):
        parse_spec({"dataset": "x", "budget": {"max_usd": 1, "auto_approve_usd": 5}})


def test_lora_accepts_a_shorthand_or_overrides():
    assert parse_spec({"dataset": "x", "lora": True}).lora.enabled is True
    spec = parse_spec({"dataset": "x", "lora": {"enabled": True, "r": 8, "target_modules": ["q_proj"]}})
    assert spec.lora.r == 8 and spec.lora.target_modules == ["q_proj"]


def test_run_names_must_be_safe_folder_names():
    with pytest.raises(SpecError, match="field 'name'"):
        parse_spec({"dataset": "x", "name": "../escape"})


def test_rewards_belong_to_the_methods_that_take_them():
    from tasks.core.methods import check_training_keys

    with pytest.raises(SpecError, match="'rewards' applies to grpo and rloo only .* method is sft"):
        check_training_keys(parse_spec({"dataset": "x", "rewards": ["exact_answer"]}))


def test_unknown_gguf_type_is_rejected_with_the_list():
    with pytest.raises(SpecError, match="outputs.gguf.0.*q4_k_m"):
        parse_spec({"dataset": "x", "outputs": {"gguf": ["q4_kk"]}})


def test_the_spec_is_frozen():
    spec = parse_spec({"dataset": "x"})
    with pytest.raises(ValidationError, match="frozen"):
        spec.model = "other"  # type: ignore[misc]


def test_broken_yaml_and_missing_files_are_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [sft\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_command_line_overrides_go_over_the_spec():
    _, spec = parse_args(
        "sft", ["--spec", str(EXAMPLES / "sft-tiny.yaml"), "--set", "training.max_steps=7", "--name", "my-run"]
    )
    assert spec.training["max_steps"] == 7 and spec.training["max_length"] == 128
    assert spec.name == "my-run"


def test_a_spec_for_another_method_is_refused_by_the_sft_command(tmp_path: Path):
    other = tmp_path / "dpo.yaml"
    other.write_text("method: dpo\ndataset: x.jsonl\n")
    with pytest.raises(SpecError, match="python -m flows.dpo"):
        parse_args("sft", ["--spec", str(other)])


def test_the_spec_is_a_flow_parameter_schema():
    schema = RunSpec.model_json_schema()
    assert schema["properties"]["method"]["enum"] == list(METHODS)
    assert "dataset" in schema["required"]


def test_every_error_code_is_in_the_docs_and_the_cli_json_carries_it(capsys, tmp_path):
    from cli.run import main
    from flows.planning import plan_run
    from flows.sft import sft
    from tasks.core.errors import ERROR_CODES
    from tests.helpers import EXAMPLES, REPO

    errors_page = (REPO / "docs" / "errors.md").read_text()
    for cls, (code, fix) in ERROR_CODES.items():
        assert f"| `{code}` | {cls} | {fix} |" in errors_page
    assert main("sft", sft, plan_run, ["--spec", str(EXAMPLES / "sft-tiny.yaml"), "--set", "methd=sft", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["code"] == "spec_invalid" and "unknown field 'methd'" in out["error"] and out["fix"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    args = ["--dataset", str(bad), "--dry-run", "--json"]
    assert main("sft", sft, plan_run, args) == 2
    out = json.loads(capsys.readouterr().out)
    assert (out["code"], out["type"]) == ("dataset_invalid", "DatasetValidationError")
