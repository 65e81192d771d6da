"""Reward functions named in a GRPO spec: resolved, checked on real rows, and packed as
source code for the self-contained training script.

A name is a built-in (training/rewards.py), a file (`my_rewards.py:brevity`, relative to
the working directory or absolute), a module (`package.module:function`), or a trained reward
model: a run folder of `method: reward`, a model folder, or a Hub id, scored by
training/rewards.py's RewardModel with the model's own tokenizer. The whole file or module
travels with the script (a module of finetune_rewards/ next to it, which the script imports),
so its helpers and imports come along; a reward model is named by its folder or id.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
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
    model: str | None = None  # a reward model's folder or Hub id: `function` is the class that scores with it


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def reward_model_source(name: str) -> str | None:
    """The folder or Hub id of the reward model a spec entry names; None when it names a function."""
    path = Path(name).expanduser()
    if path.is_dir():
        for folder in (path / "model", path):  # a run folder of `method: reward`, or the model itself
            if (folder / "config.json").is_file():
                return str(folder.resolve())
        raise RewardError(
            f"reward '{name}': folder {path.resolve()} holds no model (no config.json, nor model/config.json of a run folder)"
        )
    if ":" not in name and name not in BUILT_IN and HUB_ID.match(name):
        return name
    return None


def _built_in(name: str, function: str, model: str | None = None) -> RewardSource:
    """A reward whose code is training/rewards.py, copied whole: one module for every built-in
    function and for RewardModel, which scores with a reward model."""
    import training.rewards as built_ins

    source = inspect.getsource(built_ins)
    return RewardSource(name=name, function=function, filename="training/rewards.py", source=source, model=model)


def _load_reward_model(name: str, source: str) -> tuple[Callable[..., Any], RewardSource]:
    """Load it as TRL would and refuse anything but a sequence classifier with one score."""
    from transformers import AutoConfig

    from training.rewards import RewardModel

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:
        where = "the Hub" if not Path(source).exists() else source
        raise RewardError(
            f"reward '{name}': no model could be read from {where} ({type(e).__name__}: {str(e)[:200]}); name a run "
            "folder of `method: reward`, a model folder, or a Hub id"
        ) from None
    kinds = config.architectures or [config.model_type]
    if not any(k.endswith("ForSequenceClassification") for k in kinds) or config.num_labels != 1:
        raise RewardError(
            f"reward '{name}': {source} is {', '.join(kinds)} with {config.num_labels} label(s), not a reward model "
            "(a sequence classifier with one score); a causal language model cannot score answers: train a reward "
            "model from preference pairs with `method: reward` and name its run folder here"
        )
    return RewardModel(source), _built_in(name, "RewardModel", model=source)


def _load(name: str) -> tuple[Callable[..., Any], RewardSource]:
    model = reward_model_source(name)
    if model is not None:
        return _load_reward_model(name, model)
    if name in BUILT_IN:
        return BUILT_IN[name], _built_in(name, name)
    target, sep, function = name.rpartition(":")
    if not sep or not target or not function:
        raise RewardError(
            f"reward '{name}' is not a built-in ({', '.join(BUILT_IN)}) nor 'file.py:function' nor 'module:function', "
            "nor a reward model's folder or Hub id"
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


def resolve_rewards(
    names: list[str], pending: frozenset[str] = frozenset()
) -> list[tuple[Callable[..., Any] | None, RewardSource]]:
    """`pending`: reward models a recipe's earlier stage has yet to train (their run folders):
    named in the plan, checked when this stage starts, once they exist."""
    if not names:
        raise RewardError(f"a grpo spec needs `rewards:` (built-ins: {', '.join(BUILT_IN)}, or file.py:function)")
    return [_pending(n) if n in pending else _load(n) for n in names]


def _pending(folder: str) -> tuple[None, RewardSource]:
    return None, _built_in(folder, "RewardModel", model=str(Path(folder) / "model"))


def _dummy_completions(row: dict, conversational: bool) -> list[Any]:
    answer = str(row.get("answer", "42"))
    texts = ["", f"The answer is {answer}", "I do not know."]
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts


def check_rewards(
    rewards: list[tuple[Callable[..., Any] | None, RewardSource]], rows: list[dict], sample: int = 4
) -> None:
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
        if fn is None:  # pending: a recipe stage trains it first, and this stage's own plan checks it
            continue
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


def check_reward_models_reachable(rewards: list[RewardSource], backend: str, on_this_machine: bool) -> None:
    """A reward model in a local folder is read where the job runs: on this machine it is, on
    another it is not (only the model being trained is uploaded), so that is refused before spend."""
    local = [r for r in rewards if r.model and Path(r.model).exists()]
    if local and not on_this_machine:
        raise RewardError(
            f"reward '{local[0].name}' is a folder on this machine ({local[0].model}), and backend {backend} runs the "
            "job elsewhere: push the reward model to the Hub (its run's outputs.hub_repo) and name it by its id"
        )
