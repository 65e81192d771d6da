"""A plan is never silently wrong about tokens: an empty tokenizer is detected and replaced by
a stated estimate that a real run refuses, and chat data needs a chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.planning import plan_run
from tasks.core.methods import SFT
from tasks.core.spec import SpecError, parse_spec
from tasks.data.token_stats import CharEstimateTokenizer
from tasks.data.tokenizer import planning_tokenizer
from tasks.data.validate import DatasetValidationError, validate_dataset
from tests.helpers import EXAMPLES, REPO

CHAT = str(EXAMPLES / "data" / "sft_chat.jsonl")


def _config_only(tmp_path: Path) -> Path:
    folder = tmp_path / "qwen2.5-0.5b-config-only"
    folder.mkdir()
    shutil.copy(REPO / "tests" / "data" / "configs" / "qwen2.5-0.5b.json", folder / "config.json")
    return folder


def test_a_config_only_folder_is_planned_with_a_stated_estimate_not_zero_tokens(tmp_path):
    folder = _config_only(tmp_path)
    tokenizer = planning_tokenizer(str(folder))
    assert isinstance(tokenizer, CharEstimateTokenizer) and tokenizer.chars_per_token == 3.8
    assert "is empty (a vocabulary of" in tokenizer.why
    plan = plan_run(parse_spec({"dataset": CHAT, "model": str(folder), "name": "cfg-only", "backend": "hf-jobs"}))
    d = plan.dataset
    assert d.token_counts == "estimated" and d.tokens.mean > 10 and d.total_tokens > 4000
    assert any("ESTIMATED at 3.8 characters per token (qwen2 family)" in w for w in d.warnings)
    assert plan.cost.basis.startswith("TOKENS ESTIMATED")
    assert plan.hardware.parameters == 494_032_768
    # the plan's JSON says so too
    assert json.loads(plan.model_dump_json())["dataset"]["token_counts"] == "estimated"


def test_a_real_run_refuses_an_estimated_plan_before_anything_is_spent(prefect_server, tmp_path):
    from flows.sft import sft

    spec = parse_spec({"dataset": CHAT, "model": str(_config_only(tmp_path)), "name": "cfg-run", "backend": "hf-jobs"})
    with pytest.raises(SpecError, match="token counts, time and cost are estimates"):
        sft(spec=spec)


def test_chat_data_on_a_tokenizer_without_a_chat_template_is_stopped_with_the_fixes(tiny_model_path, tmp_path):
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model_path, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = planning_tokenizer(str(plain))
    assert not getattr(tokenizer, "chat_template", None)
    with pytest.raises(DatasetValidationError) as e:
        validate_dataset(CHAT, SFT, tokenizer, 128, tmp_path / "out")
    assert "no chat template" in str(e.value) and "training.chat_template_path" in str(e.value)
    # TRL's own option, named in the spec, fixes it: the template of another model (here the tiny one)
    fixed = planning_tokenizer(str(plain), chat_template_path=tiny_model_path)
    assert validate_dataset(CHAT, SFT, fixed, 128, tmp_path / "out").token_counts == "measured"
