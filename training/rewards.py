"""Built-in verifiable rewards for GRPO, in TRL's reward-function form.

Each function takes the batch's `completions` (strings, or lists of message dicts for
conversational prompts) plus dataset columns as keyword arguments, and returns one float
per completion (or None where the reward does not apply). The script builder copies this
file whole next to the generated training script (finetune_rewards/rewards.py), which must
not import this project: so it imports nothing from it either.
"""

from __future__ import annotations


def exact_answer(completions, answer, **kwargs):
    """1.0 when the last number in the completion equals the `answer` column, numerically
    (so "12", "12.0", "1,200" and "1200" compare as numbers), else 0.0."""
    import re

    def last_number(text):
        found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        if not found:
            return None
        try:
            return float(found[-1].replace(",", ""))
        except ValueError:
            return None

    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        got, want = last_number(text or ""), last_number(str(expected))
        scores.append(1.0 if got is not None and want is not None and abs(got - want) < 1e-9 else 0.0)
    return scores


def answer_format(completions, **kwargs):
    """1.0 when the completion ends in `= <number>` (the shipped task's answer format), or,
    if the completion uses tags, when it holds exactly one <answer>...</answer> block."""
    import re

    scores = []
    for completion in completions:
        text = (completion[-1]["content"] if isinstance(completion, list) else completion) or ""
        text = text.strip()
        if "<answer>" in text or "</answer>" in text:
            ok = len(re.findall(r"<answer>.+?</answer>", text, flags=re.DOTALL)) == 1
        else:
            ok = re.search(r"=\s*-?\d[\d,]*(?:\.\d+)?$", text) is not None
        scores.append(1.0 if ok else 0.0)
    return scores


def length_penalty(completions, **kwargs):
    """0 up to 200 characters, then -0.1 per further 100 characters (at most -1.0)."""
    scores = []
    for completion in completions:
        text = (completion[-1]["content"] if isinstance(completion, list) else completion) or ""
        scores.append(-min(1.0, max(0, len(text) - 200) / 1000))
    return scores


def code_tests(completions, tests, **kwargs):
    """1.0 when the completion's Python code passes the row's `tests` (assert statements),
    run in a separate interpreter with a 5-second limit; 0.0 on failure or timeout."""
    import re
    import subprocess
    import sys
    import tempfile

    scores = []
    for completion, test in zip(completions, tests, strict=True):
        text = (completion[-1]["content"] if isinstance(completion, list) else completion) or ""
        fenced = re.findall(r"```(?:python)?\n(.*?)```", text, flags=re.DOTALL)
        code = fenced[-1] if fenced else text
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/candidate.py"
            with open(path, "w") as f:
                f.write(code + "\n\n" + str(test) + "\n")
            try:
                done = subprocess.run(
                    [sys.executable, "-I", path], capture_output=True, timeout=5, check=False, cwd=tmp
                )
                scores.append(1.0 if done.returncode == 0 else 0.0)
            except subprocess.TimeoutExpired:
                scores.append(0.0)
    return scores


BUILT_IN = {f.__name__: f for f in (exact_answer, answer_format, length_penalty, code_tests)}
