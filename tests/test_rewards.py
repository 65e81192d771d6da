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
