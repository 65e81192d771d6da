"""Stages that are not repeated: each costly stage's result is persisted by Prefect under a
key made from its inputs, and a re-run with the same inputs gets it back instead of running.

The persistence and the lookup are Prefect's (result storage plus a cache policy that reads
the key from the task's `cache_key` parameter); what is ours is what goes into each key, and
the check that a cached result's files are still whole before it is trusted (Prefect knows
the result, not the files it describes). Records live in the run folder, `.results/`, so
they go when the run folder goes. `PREFECT_TASKS_REFRESH_CACHE=true` runs every stage again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect.cache_policies import CacheKeyFnPolicy

from tasks.core.manifest import problems, sha256_file
from tasks.core.models import RunPlan, TrainedModel

T = TypeVar("T")
KEY_VERSION = "1"  # bumped when what a stage produces changes meaning


def _key_from_parameter(context: Any, parameters: dict[str, Any]) -> str | None:
    return parameters.get("cache_key")


BY_KEY = CacheKeyFnPolicy(cache_key_fn=_key_from_parameter)


def key_of(stage: str, *parts: Any) -> str:
    """A stable key for `stage` from JSON-able parts."""
    text = json.dumps([KEY_VERSION, stage, *parts], sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def model_fingerprint(model_path: str) -> Any:
    """A model folder by its files' names, sizes and modification times (hashing tens of GB of
    weights on every start would cost minutes); a Hub id by itself."""
    folder = Path(model_path)
    if not folder.is_dir():
        return model_path
    return [
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    ]


def file_hashes(*paths: str | Path) -> dict[str, str | None]:
    return {str(p): sha256_file(Path(p)) if Path(p).is_file() else None for p in paths}


def results_dir(run_dir: Path) -> Path:
    return run_dir / ".results"


def cached_result(run_dir: Path, key: str) -> Any | None:
    """The result Prefect persisted under `key` for this run, if any (read, not run)."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir(run_dir))))
    try:
        return store.read(key).result if store.exists(key) else None
    except Exception:  # an unreadable record counts as none: the stage runs
        return None


def trusted_result(
    run_dir: Path, key: str, check: Callable[[Any], list[str]], say: Callable[[str], None], stage: str
) -> tuple[Any | None, bool]:
    """(the cached result when its files still match their record, whether a record exists
    that must be replaced). A record that no longer matches is not trusted: `check` says why."""
    hit = cached_result(run_dir, key)
    if hit is None:
        return None, False
    bad = check(hit)
    if bad:
        say(f"{stage}: the cached result does not match its files ({'; '.join(bad[:3])}); running it again")
        return None, True
    return hit, False


def call_cached(task: Any, run_dir: Path, key: str, refresh: bool, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """Call `task` through Prefect's cache under `key`; (result, whether it came from the cache).
    `refresh` runs it even when a record exists (one found untrustworthy)."""
    options: dict[str, Any] = {"result_storage": results_dir(run_dir), "persist_result": True}
    if refresh:
        options["refresh_cache"] = True
    state = task.with_options(**options)(*args, cache_key=key, return_state=True, **kwargs)
    return state.result(), state.name == "Cached"


def run_cached(
    task: Any,
    run_dir: Path,
    key: str,
    check: Callable[[Any], list[str]],
    say: Callable[[str], None],
    *args: Any,
    **kwargs: Any,
) -> tuple[Any, bool]:
    """`call_cached`, after checking whatever record exists against its files."""
    _, refresh = trusted_result(run_dir, key, check, say, task.name)
    return call_cached(task, run_dir, key, refresh, *args, **kwargs)


def _model_record(result: Any) -> list[tuple[str, str]]:
    return [(r.path, r.sha256) for r in result.manifest]


def converter_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "none"


def gguf_key(result: Any, outputs: Any) -> str:
    return key_of(
        "gguf", _model_record(result), list(outputs.gguf), outputs.gguf_strict, converter_version(), result.model_dir
    )


def smoke_key(gguf: Any, result: Any, report: Any, outputs: Any) -> str:
    return key_of(
        "smoke",
        [(f.quant, f.sha256) for f in gguf.every_file],
        _model_record(result),
        file_hashes(report.heldout_path, report.prepared_path),
        outputs.gguf_min_agreement,
        outputs.gguf_max_perplexity_ratio,
    )


def publish_key(spec: Any, job: Any, result: Any, gguf: Any) -> str:
    files = [(f.quant, f.sha256, f.passed) for f in gguf.every_file] if gguf is not None else []
    return key_of("publish", spec.model_dump(mode="json"), job.job_id, _model_record(result), files)


def gguf_problems(gguf: Any) -> list[str]:
    """GGUF files that are missing or differ from what conversion wrote."""
    found = []
    for f in gguf.every_file:
        path = Path(f.path)
        if not path.is_file():
            found.append(f"{path.name} is missing")
        elif sha256_file(path) != f.sha256:
            found.append(f"{path.name} changed since it was written (sha256 differs)")
    return found


def published_problems(published: Any) -> list[str]:
    """A folder release that is no longer as published (a Hub release is trusted: checking it
    would download it; PREFECT_TASKS_REFRESH_CACHE=true publishes again)."""
    from tasks.core.manifest import problems

    if published.url is None or not published.url.startswith("file://") or not published.repo:
        return []
    return problems(Path(published.repo), published.files) if published.files else ["no file record"]


def training_key(plan: RunPlan, backend: str) -> str:
    """What the trained model depends on: the script (hyper-parameters, method, paths), the
    data it reads, the base model, and where it runs."""
    run_dir = Path(plan.run_dir)
    return key_of(
        "train",
        plan.script.sha256,
        file_hashes(run_dir / "data" / "train.jsonl", run_dir / "data" / "heldout.jsonl"),
        model_fingerprint(plan.model_path),
        backend,
        plan.hardware.flavor,
    )


def trained_problems(trained: TrainedModel) -> list[str]:
    """Why a cached training result cannot be trusted any more (empty when it can)."""
    run_dir = Path(trained.handle.run_dir)
    found = [] if trained.result.manifest else ["no file record (an older result)"]
    return found + problems(run_dir, trained.result.manifest)
