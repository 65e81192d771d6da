"""Recipes: stages (an SFT warm-up, then DPO or GRPO, say) run in order, each starting from
the chat model the stages before made last, all paid from one budget. A stage that trains a
reward model (`method: reward`) is no starting point: a later stage names it as a reward,
`rewards: [stage:<name>]` (RLHF: SFT, then a reward model, then GRPO scored by it).

A recipe is written once, with `defaults` shared by every stage and a stage list of partial
run specs; each stage becomes a full `RunSpec` here, so every rule of a single run (fields,
datasets, rewards, TRL keys) is checked by the same code before anything runs.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.methods import method_definition
from tasks.core.rundir import runs_root
from tasks.core.spec import (
    RUN_NAME_PATTERN,
    Budget,
    RunSpec,
    SpecError,
    deep_merge,
    parse_spec,
    read_yaml,
    resolve_spec_paths,
)

RECIPE_KEYS = ("name", "model", "budget", "defaults", "stages", "outputs")
MAX_RECIPE_NAME = 40  # leaves room for "-<stage>" within a run name's 64 characters
MAX_STAGES = 8
MAX_STAGE_NAME = 64 - MAX_RECIPE_NAME - 1  # <recipe>-<stage> is a run name


class RecipeSpec(BaseModel):
    """A chain of runs. Each stage is a run spec whose `model` is the recipe's base (what it is
    planned with before the stage before it has trained) and whose `name` is the stage's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(None, description="the recipe's name; stage runs are named <name>-<stage>")
    model: str = Field("tiny", description="the model the first stage starts from, and every verdict is against")
    budget: Budget = Field(default_factory=Budget, description="one budget for all the stages together")
    stages: list[RunSpec] = Field(min_length=1, max_length=MAX_STAGES)

    @model_validator(mode="after")
    def _names(self) -> RecipeSpec:
        if self.name is not None and (len(self.name) > MAX_RECIPE_NAME or not RUN_NAME_PATTERN.match(self.name)):
            raise ValueError(
                f"name '{self.name}': at most {MAX_RECIPE_NAME} lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        names = [s.name for s in self.stages]
        long = [n for n in names if n is None or len(n) > MAX_STAGE_NAME]
        if long:
            raise ValueError(f"stage names must be 1-{MAX_STAGE_NAME} characters (they end run names); got {long}")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ; got {names}")
        return self


def stage_names(stages: list[dict[str, Any]]) -> list[str]:
    """A stage's own `name`, or its position and method (1-sft, 2-grpo)."""
    return [str(s.get("name") or f"{i + 1}-{s.get('method', 'sft')}") for i, s in enumerate(stages)]


def parse_recipe(data: Any, source: str = "recipe", base: Path | None = None) -> RecipeSpec:
    """Validate a recipe mapping: every stage is merged over `defaults`, given the recipe's
    model and budget, and checked as a run spec; errors name the stage and the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a recipe must be a mapping with a `stages` list, got {type(data).__name__}")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise SpecError(f"{source}: unknown recipe field(s) {unknown}; allowed: {', '.join(RECIPE_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise SpecError(f"{source}: `stages` must be a non-empty list of stage mappings (method, dataset, ...)")
    if len(stages) > MAX_STAGES:
        raise SpecError(f"{source}: {len(stages)} stages; a recipe has at most {MAX_STAGES}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SpecError(f"{source}: `defaults` must be a mapping of run-spec fields shared by every stage")
    top = resolve_spec_paths({"model": data.get("model", "tiny")}, base) if base else {"model": data.get("model")}
    model = top["model"] or "tiny"
    budget = data.get("budget") or {}
    outputs = data.get("outputs")
    built = []
    names = stage_names(stages)
    for i, (stage, name) in enumerate(zip(stages, names, strict=True)):
        where = f"{source}, stage {i + 1} ({name})"
        for key, why in (
            (
                "model",
                "each stage starts from the chat model the stages before made; set the recipe's `model` for the first",
            ),
            ("budget", "the budget is the recipe's, shared by all the stages"),
        ):
            if key in stage or key in defaults:
                raise SpecError(f"{where}: `{key}` is not a stage field: {why}")
        merged = deep_merge(defaults, stage)
        last = i == len(stages) - 1
        if not last:  # an intermediate model is only a starting point: no GGUF files unless asked
            merged["outputs"] = {"gguf": [], **(merged.get("outputs") or {})}
        elif outputs is not None:
            merged["outputs"] = deep_merge(merged.get("outputs") or {}, outputs)
        merged.update(name=name, model=model, budget=budget)
        if base is not None:
            merged = resolve_spec_paths(merged, base)
            merged["model"] = model
        built.append(parse_spec(merged, source=where))
    check_stage_rewards(built, source)
    try:
        return RecipeSpec.model_validate({"name": data.get("name"), "model": model, "budget": budget, "stages": built})
    except ValidationError as e:
        raise SpecError(
            f"{source} is not a valid recipe:\n  - "
            + "\n  - ".join(f"{'.'.join(map(str, x['loc'])) or 'recipe'}: {x['msg']}" for x in e.errors())
        ) from None


STAGE_REWARD = "stage:"


def check_stage_rewards(stages: list[RunSpec], source: str) -> None:
    """`stage:<name>` in a stage's rewards names an earlier stage that trains a reward model."""
    for i, stage in enumerate(stages):
        for reward in (r for r in stage.rewards if r.startswith(STAGE_REWARD)):
            name = reward.removeprefix(STAGE_REWARD)
            earlier = {str(s.name): s for s in stages[:i]}
            if name not in earlier or method_definition(earlier[name].method).head != "sequence_classification":
                makers = [
                    n for n, s in earlier.items() if method_definition(s.method).head == "sequence_classification"
                ]
                raise SpecError(
                    f"{source}, stage {i + 1} ({stage.name}): reward '{reward}' must name an earlier stage with "
                    f"method: reward; the earlier ones that train a reward model: {', '.join(makers) or 'none'}"
                )


def chat_model_from(recipe: RecipeSpec, index: int) -> int | None:
    """The stage whose model stage `index` starts from: the last earlier one that makes a chat
    model (a reward model scores; it is not trained further); None: the recipe's base."""
    found = [i for i in range(index) if method_definition(recipe.stages[i].method).head == "causal_lm"]
    return found[-1] if found else None


def stage_reward_folders(recipe: RecipeSpec, recipe_name: str, index: int) -> dict[str, str]:
    """Each `stage:<name>` reward of stage `index`, and the run folder that stage trains it in."""
    return {
        r: str(
            runs_root()
            / stage_run_name(recipe_name, next(s for s in recipe.stages if s.name == r.removeprefix(STAGE_REWARD)))
        )
        for r in recipe.stages[index].rewards
        if r.startswith(STAGE_REWARD)
    }


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> RecipeSpec:
    """A recipe file. Paths are relative to it; `overrides` (from --set) are recipe fields, or
    `<stage>.<field>` for one stage (`warmup.training.max_steps=10`)."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    if isinstance(data, dict) and "stages" not in data:
        raise SpecError(
            f"{path} is a single run spec, not a recipe (no `stages`); run it with python -m flows.<method>"
        )
    if isinstance(data, dict) and overrides:
        stages = data.get("stages") if isinstance(data.get("stages"), list) else []
        by_name = dict(zip(stage_names(stages), range(len(stages)), strict=True))
        for key, value in overrides.items():
            if key in by_name and isinstance(value, dict):
                stages[by_name[key]] = deep_merge(stages[by_name[key]], value)
            else:
                data = deep_merge(data, {key: value})
    return parse_recipe(data, source=str(path), base=path.parent)


def default_recipe_name(recipe: RecipeSpec, now: datetime | None = None) -> str:
    methods = "-".join(dict.fromkeys(s.method for s in recipe.stages))
    return f"{methods}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def stage_run_name(recipe_name: str, stage: RunSpec) -> str:
    return f"{recipe_name}-{stage.name}"


def remaining_budget(budget: Budget, spent_usd: float) -> Budget:
    """What a stage may spend and have approved automatically: the recipe's limits less what
    the stages before it spent, so the chain as a whole stays within them."""
    return budget.model_copy(
        update={
            "max_usd": max(0.0, budget.max_usd - spent_usd),
            "auto_approve_usd": max(0.0, budget.auto_approve_usd - spent_usd),
        }
    )


def chained_stage(recipe: RecipeSpec, recipe_name: str, index: int, model: str, spent_usd: float) -> RunSpec:
    """Stage `index` as the run it becomes: its own run name, the previous stage's model, what is
    left of the budget, and (after the first stage) the recipe's base model as the evaluation's
    baseline, so its verdict can be read against where the chain began."""
    stage = recipe.stages[index]
    evaluation = stage.evaluation
    if index > 0 and evaluation.baseline is None:
        evaluation = evaluation.model_copy(update={"baseline": recipe.model})
    folders = stage_reward_folders(recipe, recipe_name, index)
    return stage.model_copy(
        update={
            "name": stage_run_name(recipe_name, stage),
            "model": model,
            "budget": remaining_budget(recipe.budget, spent_usd),
            "evaluation": evaluation,
            "rewards": [folders.get(r, r) for r in stage.rewards],
        }
    )
