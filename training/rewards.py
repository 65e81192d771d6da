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


class RewardModel:
    """A trained reward model (a sequence classifier with one score, such as `method: reward`
    makes) as a reward function: each prompt and completion rendered through the reward
    model's own tokenizer and chat template, scored a batch at a time. `source` is its folder
    or Hub id; TRL logs a reward under its `__name__`."""

    def __init__(self, source, batch_size=8):
        import os

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(source).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.batch_size = batch_size
        folder = str(source).rstrip("/")
        name = os.path.basename(os.path.dirname(folder)) if os.path.basename(folder) == "model" else folder
        self.__name__ = "reward_model_" + os.path.basename(name).replace("-", "_")  # a run folder's model/: the run

    def text(self, prompt, completion):
        if isinstance(prompt, list):  # conversational: the whole exchange through the chat template
            turns = prompt + (
                completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            )
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return prompt + (completion[-1]["content"] if isinstance(completion, list) else completion)

    def __call__(self, prompts, completions, **kwargs):
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(self.model.device)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


BUILT_IN = {f.__name__: f for f in (exact_answer, answer_format, length_penalty, code_tests)}
