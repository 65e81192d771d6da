"""Task evaluations named in the spec (`evaluation.tasks`), run by EleutherAI's
lm-evaluation-harness inside the job, on local data files, for the base and the trained model.

What is ours: reading the user's task YAML, refusing what cannot run offline (a Hub dataset,
`include:`, `!function`), copying its data files into the run folder so they travel with the
script, and the paired before/after comparison of the per-row scores the harness logs. The
prompts, metrics and scoring are the harness's own.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tasks.core.errors import UserFacingError
from tasks.core.models import HarnessTask, TaskComparison
from tasks.core.spec import RunSpec, SpecError

LOCAL_BUILDERS = ("json", "csv", "parquet", "text")
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
HARNESS_VERSION = "0.4.13"


class TaskError(UserFacingError, ValueError):
    """A task evaluation that cannot run offline or that the harness refuses; names the file."""


class _TaggedLoader(yaml.SafeLoader):
    """Reads harness YAML, keeping `!function` and other tags visible instead of failing."""


_TaggedLoader.add_multi_constructor("!", lambda loader, suffix, node: {"__tag__": suffix})


def _tags(value: Any) -> list[str]:
    if isinstance(value, dict):
        if "__tag__" in value:
            return [str(value["__tag__"])]
        return [t for v in value.values() for t in _tags(v)]
    if isinstance(value, list):
        return [t for v in value for t in _tags(v)]
    return []


def _data_files(value: Any) -> dict[str, list[str]]:
    if isinstance(value, str):
        return {"train": [value]}
    if isinstance(value, list):
        return {"train": [str(v) for v in value]}
    if isinstance(value, dict):
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in value.items()}
    return {}


def _rows(path: Path) -> int:
    if path.suffix in (".jsonl", ".json", ".txt", ".csv"):
        with path.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        return max(0, lines - 1) if path.suffix == ".csv" else lines
    return 0  # parquet: counted by the harness


class _Read(BaseModel):
    """A task YAML as read and checked, before anything is copied."""

    name: str
    source: str
    config: dict[str, Any]
    files: dict[str, list[Path]]
    split: str
    output_type: str
    metric: str
    higher_is_better: bool
    rows: int
    scored_tokens: int
    generated_tokens: int


def _load_config(path: Path, where: str) -> dict[str, Any]:
    """The task YAML parsed, refusing what would not travel with the job: a missing file, bad
    YAML, no task name, `include:` and YAML tags (Python code by reference)."""
    if not path.is_file():
        raise TaskError(
            f"{where} does not exist; give an lm-evaluation-harness task YAML (paths are relative to the spec)"
        )
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaggedLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise TaskError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise TaskError(f"{where} has no `task:` name; one task per file (groups are not supported)")
    if "include" in config:
        raise TaskError(
            f"{where}: `include:` is not supported (the included file would not travel with the job); copy its "
            "settings into this file"
        )
    tags = _tags(config)
    if tags:
        raise TaskError(
            f"{where}: YAML tags ({', '.join('!' + t for t in sorted(set(tags)))}) point at Python code that would "
            "not travel with the job; use the harness's template fields (doc_to_text, doc_to_target, doc_to_choice)"
        )
    return config


def _checked_splits(config: dict[str, Any], where: str) -> tuple[dict[str, list[str]], str, str]:
    """The data files named per split, the output type and the split to evaluate, checked so the
    task reads local files only and every split it names has files."""
    name = config["task"]
    builder = config.get("dataset_path")
    named = _data_files((config.get("dataset_kwargs") or {}).get("data_files"))
    if builder not in LOCAL_BUILDERS or not named:
        raise TaskError(
            f"{where}: task '{name}' reads dataset_path '{builder}'; task evaluations run offline, on local files: "
            f"set dataset_path to one of {', '.join(LOCAL_BUILDERS)} and dataset_kwargs.data_files to your file(s)"
        )
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"{where}: output_type '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
    split = config.get("test_split") or config.get("validation_split")
    if split is None or split not in named:
        raise TaskError(
            f"{where}: the split to evaluate (test_split '{config.get('test_split')}') must be a key of "
            f"dataset_kwargs.data_files (it has {', '.join(named)})"
        )
    for other in ("training_split", "validation_split", "fewshot_split"):
        if config.get(other) and config[other] not in named:
            raise TaskError(f"{where}: {other} '{config[other]}' is not a key of dataset_kwargs.data_files")
    return named, output_type, split


def _found_files(named: dict[str, list[str]], folder: Path, where: str) -> dict[str, list[Path]]:
    """Each split's data files, relative ones found next to the task YAML; a missing one is refused
    now rather than in the job."""
    files: dict[str, list[Path]] = {}
    for split_name, names in named.items():
        files[split_name] = []
        for file in names:
            found = Path(file) if Path(file).is_absolute() else folder / file
            if not found.is_file():
                raise TaskError(f"{where}: data file {found} (split {split_name}) does not exist")
            files[split_name].append(found)
    return files


def read_task(source: str) -> _Read:
    """One task YAML, checked for what the job needs offline: a task name, local data files
    that exist, a split to evaluate, no Python code by reference."""
    path = Path(source)
    where = f"evaluation.tasks: {source}"
    config = _load_config(path, where)
    named, output_type, split = _checked_splits(config, where)
    files = _found_files(named, path.parent, where)
    metrics = config.get("metric_list") or [{"metric": "acc" if output_type == "multiple_choice" else "exact_match"}]
    first = metrics[0] if isinstance(metrics[0], dict) else {"metric": str(metrics[0])}
    rows = sum(_rows(f) for f in files[split])
    text_bytes = sum(f.stat().st_size for f in files[split])
    gen_limit = int((config.get("generation_kwargs") or {}).get("max_gen_toks", 256))
    return _Read(
        name=config["task"],
        source=str(path),
        config=config,
        files=files,
        split=split,
        output_type=output_type,
        metric=str(first["metric"]),
        higher_is_better=bool(first.get("higher_is_better", True)),
        rows=rows,
        # about 4 bytes a token; a multiple-choice row is scored once per choice (4 assumed)
        scored_tokens=int(text_bytes / 4 * (4 if output_type == "multiple_choice" else 1)),
        generated_tokens=rows * gen_limit if output_type == "generate_until" else 0,
    )


def task_work(sources: list[str]) -> tuple[int, int]:
    """Tokens the tasks score and generate per model, for the time estimate (0 for a task that
    cannot be read: planning refuses it with its reason)."""
    scored = generated = 0
    for source in sources:
        try:
            read = read_task(source)
        except TaskError:
            continue
        scored, generated = scored + read.scored_tokens, generated + read.generated_tokens
    return scored, generated


def prepare_tasks(sources: list[str], run_dir: Path) -> list[HarnessTask]:
    """Each task YAML checked, with its data files copied into run_dir/evals/<task>/ so that
    they travel with the script to any backend."""
    folder = run_dir / "evals"
    if folder.exists():
        shutil.rmtree(folder)
    tasks: list[HarnessTask] = []
    for source in sources:
        read = read_task(source)
        if any(t.name == read.name for t in tasks):
            raise TaskError(f"evaluation.tasks: {source}: a second task named '{read.name}'; task names must differ")
        target = folder / read.name
        target.mkdir(parents=True, exist_ok=True)
        copied: dict[str, list[str]] = {}
        for split_name, found in read.files.items():
            copied[split_name] = []
            for i, file in enumerate(found):
                dst = target / f"{split_name}-{i}{''.join(file.suffixes)}"
                shutil.copyfile(file, dst)
                copied[split_name].append(str(dst.relative_to(run_dir)))
        kwargs = {**(read.config.get("dataset_kwargs") or {}), "data_files": copied}
        tasks.append(
            HarnessTask(
                name=read.name,
                source=read.source,
                output_type=read.output_type,
                rows=read.rows,
                metric=read.metric,
                higher_is_better=read.higher_is_better,
                config={**read.config, "dataset_kwargs": kwargs},
                scored_tokens=read.scored_tokens,
                generated_tokens=read.generated_tokens,
            )
        )
    return tasks


def check_with_harness(tasks: list[HarnessTask], run_dir: Path) -> None:
    """Have the harness build each task and render its first row (prompt, target, choices),
    so a template naming a missing field fails here, before any spend. Skipped (with no
    error) where the harness is not installed: the job installs it from the script's pins."""
    if not tasks:
        return
    try:
        import datasets
        from lm_eval.tasks import TaskManager
    except ImportError:
        return
    # Local files only: offline, the json builder's telemetry call would stall. The setting is
    # process-wide, so it is put back for whatever this process loads next (a Hub dataset).
    offline, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
    try:
        manager = TaskManager(include_defaults=False)
        for task in tasks:
            _render_first_row(manager, task, run_dir)
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _render_first_row(manager: Any, task: HarnessTask, run_dir: Path) -> None:
    config = runnable_config(task, run_dir, run_dir / ".cache" / "datasets")
    try:
        built = next(iter(manager.load([config])["tasks"].values()))
        doc = next(iter(built.eval_docs))
        built.doc_to_text(doc)
        built.doc_to_target(doc)
        if task.output_type == "multiple_choice":
            built.doc_to_choice(doc)
    except StopIteration:
        raise TaskError(f"evaluation.tasks: {task.source}: the split to evaluate has no rows") from None
    except Exception as e:  # the harness raises KeyError, jinja2 errors, FileNotFoundError, ...
        raise TaskError(
            f"evaluation.tasks: {task.source}: the harness cannot use it: {type(e).__name__}: {e}"
        ) from None


def runnable_config(task: HarnessTask, root: Path, cache_dir: Path) -> dict[str, Any]:
    """The task config with its data files under `root` (the script's folder) and the datasets
    cache in `cache_dir`; the same transformation the script makes where it runs."""
    kwargs = dict(task.config["dataset_kwargs"])
    kwargs["data_files"] = {k: [str(root / f) for f in v] for k, v in kwargs["data_files"].items()}
    kwargs["cache_dir"] = str(cache_dir)
    return {**task.config, "dataset_kwargs": kwargs}


def compare_task(name: str, record: dict[str, Any], sigmas: float) -> TaskComparison:
    """The paired before/after comparison of one task's per-row scores."""
    before, after = record["before"], record["after"]
    if len(before) != len(after) or not before:
        raise TaskError(f"task {name}: {len(before)} base rows but {len(after)} trained rows")
    sign = 1.0 if record.get("higher_is_better", True) else -1.0
    changes = [sign * (a - b) for b, a in zip(before, after, strict=True)]
    change = statistics.fmean(changes)
    band = sigmas * statistics.stdev(changes) / math.sqrt(len(changes)) if len(changes) > 1 else 0.0
    verdict = "improved" if change > band else "worse" if change < -band else "no change"
    stderr = record.get("stderr") or {}
    return TaskComparison(
        task=name,
        metric=record["metric"],
        rows=len(before),
        base=statistics.fmean(before),
        trained=statistics.fmean(after),
        change=change,
        noise_band=band,
        verdict=verdict,
        higher_is_better=sign > 0,
        base_stderr=stderr.get("before"),
        trained_stderr=stderr.get("after"),
    )


def harness_tasks(spec: RunSpec, run_dir: Path, on_this_machine: bool) -> list[HarnessTask]:
    """The spec's task evaluations, checked and their data copied into the run folder; the
    harness renders each task's first row here when it is installed."""
    if not spec.evaluation.tasks:
        return []
    if on_this_machine and importlib.util.find_spec("lm_eval") is None:
        raise SpecError(
            "evaluation.tasks run through lm-evaluation-harness, which is not installed here: "
            "pip install -e '.[eval]' (or pip install lm-eval), or drop evaluation.tasks"
        )
    tasks = prepare_tasks(list(spec.evaluation.tasks), run_dir)
    check_with_harness(tasks, run_dir)
    return tasks
