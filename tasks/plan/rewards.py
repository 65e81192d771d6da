"""Reward functions named in a GRPO spec: resolved, checked on real rows, and packed as
source code for the self-contained training script.

A name is a built-in (training/rewards.py), a file (`my_rewards.py:brevity`, relative to
the working directory or absolute) or a module (`package.module:function`). The whole
file or module travels with the script (a module of finetune_rewards/ next to it, which
the script imports), so its helpers and imports come along.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.errors import UserFacingError
from training.rewards import BUILT_IN


class RewardError(UserFacingError, ValueError):
    """A reward that cannot be used; the message names it and says why."""


class RewardSource(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # as written in the spec
    function: str
    filename: str
    source: str


def _load(name: str) -> tuple[Callable[..., Any], RewardSource]:
    if name in BUILT_IN:
        fn = BUILT_IN[name]
        source = inspect.getsource(inspect.getmodule(fn))  # the built-ins' file, whole: one module for them all
        return fn, RewardSource(name=name, function=name, filename="training/rewards.py", source=source)
    target, sep, function = name.rpartition(":")
    if not sep or not target or not function:
        raise RewardError(
            f"reward '{name}' is not a built-in ({', '.join(BUILT_IN)}) nor 'file.py:function' nor 'module:function'"
        )
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward '{name}': file {path.resolve()} does not exist")
        spec = importlib.util.spec_from_file_location(f"finetune_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:
            raise RewardError(f"reward '{name}': importing {path} failed: {type(e).__name__}: {e}") from None
        source, filename = path.read_text(encoding="utf-8"), path.name
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RewardError(f"reward '{name}': importing module '{target}' failed: {type(e).__name__}: {e}") from None
        source, filename = inspect.getsource(module), f"{target.replace('.', '/')}.py"
    fn = getattr(module, function, None)
    if not callable(fn):
        raise RewardError(f"reward '{name}': {target} has no function '{function}'")
    return fn, RewardSource(name=name, function=function, filename=filename, source=source)


def resolve_rewards(names: list[str]) -> list[tuple[Callable[..., Any], RewardSource]]:
    if not names:
        raise RewardError(f"a grpo spec needs `rewards:` (built-ins: {', '.join(BUILT_IN)}, or file.py:function)")
    return [_load(n) for n in names]


def _dummy_completions(row: dict, conversational: bool) -> list[Any]:
    answer = str(row.get("answer", "42"))
    texts = ["", f"The answer is {answer}", "I do not know."]
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts


def check_rewards(rewards: list[tuple[Callable[..., Any], RewardSource]], rows: list[dict], sample: int = 4) -> None:
    """Call every reward as GRPOTrainer would, on real rows with dummy completions; fail
    before any spend if one raises or returns the wrong shape."""
    rows = rows[:sample]
    conversational = isinstance(rows[0]["prompt"], list)
    prompts, completions, columns = [], [], {}
    for row in rows:
        for completion in _dummy_completions(row, conversational):
            prompts.append(row["prompt"])
            completions.append(completion)
            for key, value in row.items():
                if key != "prompt":
                    columns.setdefault(key, []).append(value)
    n = len(completions)
    for fn, src in rewards:
        try:
            out = fn(prompts=prompts, completions=completions, completion_ids=[[0]] * n, **columns)
        except Exception as e:
            raise RewardError(
                f"reward '{src.name}' raised {type(e).__name__}: {e} when called on the first {len(rows)} row(s) "
                f"with dummy completions (columns passed: {', '.join(sorted(columns)) or 'none'})"
            ) from None
        if not isinstance(out, list | tuple) or len(out) != n:
            got = f"{len(out)} values" if isinstance(out, list | tuple) else type(out).__name__
            raise RewardError(f"reward '{src.name}' must return a list of {n} floats (one per completion), got {got}")
        bad = [v for v in out if v is not None and not (isinstance(v, int | float) and math.isfinite(v))]
        if bad:
            raise RewardError(f"reward '{src.name}' returned {bad[0]!r}; rewards must be finite numbers or None")
