"""GRPO rewards: the built-ins score what they claim; user rewards are loaded from files or
modules and checked on real rows before any spend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.plan.rewards import RewardError, check_rewards, resolve_rewards
from training.rewards import answer_format, code_tests, exact_answer, length_penalty

ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": str(a + 1)} for a in range(4)]


def _c(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_exact_answer_compares_the_last_number_numerically():
    got = exact_answer(
        ["3 + 4 = 7", "7.0", "it is 1,200", "8", "no number", _c("2 + 5 = 7")], ["7", "7", "1200", "7", "7", "7"]
    )
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_format_and_length_rewards():
    assert answer_format(["3 + 4 = 7", "seven", "<answer>7</answer>", "<answer>7</answer><answer>8</answer>"]) == [
        1.0,
        0.0,
        1.0,
        0.0,
    ]
    assert length_penalty(["x" * 100, "x" * 700, "x" * 5000]) == [0.0, -0.5, -1.0]


def test_code_tests_run_in_a_separate_process_with_a_time_limit():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a - b"
    hang = "def add(a, b):\n    while True: pass"
    tests = "assert add(2, 3) == 5"
    assert code_tests([good, wrong, hang], [tests, tests, tests]) == [1.0, 0.0, 0.0]


def test_built_ins_and_user_files_resolve_with_their_source(tmp_path):
    user = tmp_path / "my_rewards.py"
    user.write_text(
        "def _words(t):\n    return len(t.split())\n\n"
        "def brevity(completions, **kw):\n    return [-_words(c[-1]['content']) / 10 for c in completions]\n"
    )
    resolved = resolve_rewards(["exact_answer", f"{user}:brevity"])
    assert [src.function for _, src in resolved] == ["exact_answer", "brevity"]
    assert "def _words" in resolved[1][1].source  # the whole file travels, helpers included
    check_rewards(resolved, ROWS)


def test_unusable_rewards_fail_before_any_spend(tmp_path):
    with pytest.raises(RewardError, match="not a built-in"):
        resolve_rewards(["exact_answr"])
    with pytest.raises(RewardError, match="does not exist"):
        resolve_rewards([f"{tmp_path}/nope.py:f"])
    with pytest.raises(RewardError, match="needs `rewards:`"):
        resolve_rewards([])
    user = tmp_path / "bad_rewards.py"
    user.write_text(
        "def boom(completions, **kw):\n    raise KeyError('solution')\n\n"
        "def short(completions, **kw):\n    return [1.0]\n\n"
        "def texty(completions, **kw):\n    return ['good'] * len(completions)\n"
    )
    with pytest.raises(RewardError, match=r"reward '.*:boom' raised KeyError: 'solution' .*columns passed: answer"):
        check_rewards(resolve_rewards([f"{user}:boom"]), ROWS)
    with pytest.raises(RewardError, match="must return a list of 12 floats"):
        check_rewards(resolve_rewards([f"{user}:short"]), ROWS)
    with pytest.raises(RewardError, match="returned 'good'"):
        check_rewards(resolve_rewards([f"{user}:texty"]), ROWS)
    with pytest.raises(RewardError, match="has no function 'missing'"):
        resolve_rewards([f"{user}:missing"])
    assert Path(user).exists()


def test_reward_files_are_found_next_to_the_spec(tmp_path):
    from tasks.core.spec import load_spec

    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "run.yaml").write_text(
        "method: grpo\ndataset: x.jsonl\nrewards: [exact_answer, my_rewards.py:brevity]\n"
    )
    spec = load_spec(tmp_path / "run.yaml")
    assert spec.rewards == ["exact_answer", f"{tmp_path / 'my_rewards.py'}:brevity"]


@pytest.fixture(scope="module")
def reward_model_run(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `method: reward` leaves it (model/ a one-score classifier), untrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path_factory.mktemp("reward-run")
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(run / "model")
    return run


def test_a_reward_model_is_a_reward_scored_with_its_own_tokenizer(reward_model_run):
    """A run folder (or its model folder) names a reward model; it is loaded and scores real
    rows before any spend, and travels to the script as its folder beside the scoring class."""
    from tasks.plan.script import reward_modules

    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"}] * 2
    resolved = resolve_rewards([str(reward_model_run), "answer_format"])
    check_rewards(resolved, rows)  # finite scores, one per completion
    scorer, source = resolved[0]
    assert source.model == str(reward_model_run / "model") and source.function == "RewardModel"
    assert scorer.__name__ == f"reward_model_{reward_model_run.name.replace('-', '_')}"
    entries, files = reward_modules([src.model_dump() for _, src in resolved])
    assert entries[0]["model"] == source.model and entries[0]["module"] == entries[1]["module"]  # one copied file
    assert "class RewardModel" in files[f"finetune_rewards/{entries[0]['module'].split('.')[-1]}.py"]


def test_what_is_not_a_reward_model_is_refused_before_any_spend(tiny_model_path, reward_model_run, tmp_path):
    from tasks.plan.rewards import check_reward_models_reachable

    with pytest.raises(RewardError, match="not a reward model .* train a reward model from preference pairs"):
        resolve_rewards([tiny_model_path])  # a causal LM
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="holds no model"):
        resolve_rewards([str(tmp_path / "empty")])
    _, source = resolve_rewards([str(reward_model_run)])[0]
    with pytest.raises(RewardError, match="push the reward model to the Hub"):
        check_reward_models_reachable([source], "hf-jobs", on_this_machine=False)
    check_reward_models_reachable([source], "local", on_this_machine=True)


def test_a_reward_model_is_planned_in_memory_and_time_beside_the_policy(reward_model_run, tiny_model_path, tmp_path):
    """GRPO holds each reward model beside the policy and scores every sequence with it; a
    reward function takes neither; a recipe stage's reward model not yet trained counts as the
    policy's size (it is trained from the same base)."""
    from tasks.core.methods import GRPO
    from tasks.plan.memory import Architecture, Workload, flops_per_token, memory_breakdown_gb, reward_model_sizes
    from tests.helpers import hf_config

    arch = Architecture.from_config(hf_config("llama-3.1-8b"))
    sizes = reward_model_sizes([str(reward_model_run), "answer_format", str(tmp_path / "not-trained-yet")])
    assert sizes[0] and sizes[0] > 2_000_000 and sizes[1] is None and len(sizes) == 2
    plain = Workload.of(GRPO, mode="lora")
    scored = Workload.of(GRPO, mode="lora", reward_models=(None,))
    assert memory_breakdown_gb(arch, scored, "gpu", 80)["reward models"] == pytest.approx(
        arch.params * 2 / 1024**3, abs=1e-3
    )
    assert "reward models" not in memory_breakdown_gb(arch, plain, "gpu", 80)
    assert flops_per_token(arch, scored) > flops_per_token(arch, plain)


def test_a_reward_model_on_the_hub_is_named_by_its_id(jobs_env, reward_model_run):
    """A Hub id (here the stand-in of the Hub's API) is downloaded through huggingface_hub and
    checked like a folder: it loads, it is a one-score classifier, it scores real rows."""
    from tasks.core.hub_access import make_api
    from tests.jobs_standin import STANDIN_TOKEN

    repo = "standin-user/tiny-reward"
    api = make_api(STANDIN_TOKEN)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(reward_model_run / "model"))
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"}]
    resolved = resolve_rewards([repo])
    check_rewards(resolved, rows)
    assert resolved[0][1].model == repo  # the job downloads it by its id, wherever it runs
    with pytest.raises(RewardError, match="no model could be read from the Hub"):
        resolve_rewards(["standin-user/no-such-reward-model"])
