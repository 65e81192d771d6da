"""Publish the model, its adapter, GGUF files and card, to the Hub or a folder.

The release is first staged in `runs/<name>/release/` with exactly the layout of the Hub
repo; then it goes either to a local folder (`outputs.hub_repo: ./folder` or `file://...`),
copying only files whose content changed, or to the Hub through huggingface_hub's
`upload_folder` (large files through its large-file path). The token comes from
`HF_TOKEN` or a Prefect Secret block and is scrubbed from every message that leaves here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from tasks.core.errors import UserFacingError
from tasks.core.faults import attempts_of, is_offline, say_retry, status_of, with_retries
from tasks.core.hub_access import DEFAULT_SECRET_BLOCK, SECRET_BLOCK_ENV, make_api, resolve_token, scrub
from tasks.core.manifest import record, sha256_file
from tasks.core.models import EvaluationResult, GgufFiles, JobResult, JobStatus, PublishedModel, RunPlan, StageOutcome
from tasks.core.spec import RunSpec
from tasks.data.reading import HUB_ID
from tasks.export.model_card import example_image

RETRY_DELAYS_S = (2.0, 5.0, 15.0, 30.0)


class PublishError(UserFacingError, RuntimeError):
    """Publishing failed; the message says what to fix and never contains the token."""


def publish_target(hub_repo: str) -> tuple[Literal["folder", "hub"], str]:
    """`owner/name` is a Hub repo; a path (absolute, ./, ../, ~ or file://) is a local folder."""
    if hub_repo.startswith("file://"):
        return "folder", str(Path(hub_repo.removeprefix("file://")).expanduser().resolve())
    if hub_repo.startswith(("/", "./", "../", "~")):
        return "folder", str(Path(hub_repo).expanduser().resolve())
    if HUB_ID.match(hub_repo):
        return "hub", hub_repo
    raise PublishError(
        f"outputs.hub_repo '{hub_repo}' is neither a Hub repo id ('owner/name') nor a local folder "
        "('./folder', '/abs/path' or 'file:///abs/path')"
    )


def _copy_into(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def stage_release(run_dir: Path, result: JobResult, gguf: GgufFiles | None, card: str, loss_png: Path | None) -> Path:
    """Lay out the release folder: model files at the top, adapter/, gguf/, README.md, loss.png."""
    release = run_dir / "release"
    if release.exists():
        shutil.rmtree(release)
    release.mkdir(parents=True)
    for f in Path(result.model_dir).iterdir():
        if f.is_file():
            _copy_into(f, release / f.name)
    if result.adapter_dir:
        for f in Path(result.adapter_dir).iterdir():
            if f.is_file():
                _copy_into(f, release / "adapter" / f.name)
    if gguf is not None:
        for g in gguf.every_file:
            if g.passed:
                _copy_into(Path(g.path), release / "gguf" / Path(g.path).name)
        if gguf.modelfile and any(g.passed for g in gguf.files):
            _copy_into(Path(gguf.modelfile), release / "gguf" / "Modelfile")
        example = example_image(gguf)
        if example is not None:  # the held-out image the card's example asks about
            _copy_into(Path(gguf.mmproj.image), release / example)  # type: ignore[union-attr]
    if loss_png is not None:
        _copy_into(loss_png, release / "loss.png")
    scores = evaluation_scores(run_dir)
    if scores is not None:
        (release / "evaluation.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
    (release / "README.md").write_text(card, encoding="utf-8")
    return release


def evaluation_scores(run_dir: Path) -> dict | None:
    """The per-row numbers behind the card's verdict (no row text: the rows are the user's
    data, in the run folder's data/heldout.jsonl), so that anyone can check the verdict."""
    try:
        record = json.loads((run_dir / "train_result.json").read_text(encoding="utf-8")).get("evaluation")
    except (OSError, ValueError):
        return None
    if not record:
        return None
    per_row = {k: record[k]["per_row"] for k in ("before", "after", "baseline") if isinstance(record.get(k), dict)}
    tasks = {
        name: {
            "metric": found["metric"],
            "base": found["per_row"],
            "trained": record["tasks"]["after"][name]["per_row"],
        }
        for name, found in ((record.get("tasks") or {}).get("before") or {}).items()
        if name in ((record.get("tasks") or {}).get("after") or {})
    }
    return {
        "rows": record.get("rows", 0),
        "note": "row i is line i of the held-out file (data/heldout.jsonl in the run folder); 'before' is the model "
        "this run started from, 'after' the trained one, 'baseline' a recipe's first model",
        **{k: v for k, v in per_row.items()},
        **({"tasks": tasks} if tasks else {}),
    }


def publish_to_folder(release: Path, target: Path) -> tuple[list[str], list[str]]:
    """Make `target` hold exactly the release; copy only changed files. Returns (written, removed).

    Before anything changes, the release it holds is kept in `<target>.previous/` (hard links:
    no extra space, and each file is replaced by a new one, so the links keep the old
    content), to be restored by renaming if the new release is not wanted."""
    wanted = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    changed = [
        rel
        for rel in sorted(wanted)
        if not (
            (target / rel).exists()
            and (target / rel).stat().st_size == (release / rel).stat().st_size
            and sha256_file(target / rel) == sha256_file(release / rel)
        )
    ]
    stale = sorted(
        p.relative_to(target).as_posix()
        for p in (target.rglob("*") if target.exists() else [])
        if p.is_file() and p.relative_to(target).as_posix() not in wanted
    )
    if (changed or stale) and target.exists() and any(p.is_file() for p in target.rglob("*")):
        keep_previous(target)
    target.mkdir(parents=True, exist_ok=True)
    for rel in changed:
        _copy_into(release / rel, target / rel)
    for rel in stale:
        (target / rel).unlink()
    return changed, stale


def keep_previous(target: Path) -> Path:
    """Snapshot a folder target into `<target>.previous/` (replacing an older snapshot)."""
    previous = target.with_name(target.name + ".previous")
    partial = target.with_name(target.name + ".previous.partial")
    if partial.exists():  # left by an interrupted snapshot
        shutil.rmtree(partial)
    for src in target.rglob("*"):
        if src.is_file():
            dst = partial / src.relative_to(target)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # a file system without hard links: copy
                shutil.copy2(src, dst)
    if previous.exists():
        shutil.rmtree(previous)
    partial.rename(previous)
    return previous


def publish_to_hub(
    release: Path, repo_id: str, private: bool, token: str | None, message: str, endpoint: str | None = None
) -> str:
    """Create the repo if needed and upload the release; returns the commit URL.

    Unchanged files are skipped by huggingface_hub itself (it compares content hashes with
    what the repo holds), so a re-run uploads only what changed. A failed attempt is safe to
    repeat: large files already stored are not sent again, and a commit is all or nothing.
    """
    if not token:
        raise PublishError(
            f"no Hugging Face token to publish to '{repo_id}': set HF_TOKEN, or store a token with write "
            f"access in a Prefect Secret block named '{os.environ.get(SECRET_BLOCK_ENV, DEFAULT_SECRET_BLOCK)}'"
        )
    api = make_api(token, endpoint)

    def upload() -> str:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(release),
            repo_id=repo_id,
            repo_type="model",
            commit_message=message,
            delete_patterns=["*"],  # the repo ends up holding exactly the release
        )
        return str(getattr(commit, "commit_url", commit))

    try:
        return with_retries(upload, RETRY_DELAYS_S, on_retry=say_retry(f"publishing to {repo_id}"))
    except Exception as e:
        raise publish_refusal(repo_id, e, token) from None


def publish_refusal(repo_id: str, e: BaseException, token: str | None) -> PublishError:
    """What failed and what to do about it, without the token."""
    status = status_of(e)
    if status in (401, 403):
        return PublishError(
            f"the Hub refused the token (HTTP {status}) for '{repo_id}': "
            + (
                "the token from HF_TOKEN (or the Secret block) is invalid or expired"
                if status == 401
                else f"the token lacks write access to '{repo_id.split('/')[0]}' (use a token with the "
                "'write' role, or a fine-grained token allowed to write repos in that namespace)"
            )
        )
    if is_offline(e):
        return PublishError(
            f"cannot publish to '{repo_id}': HF_HUB_OFFLINE=1 is set, so huggingface_hub makes no network "
            "call. Unset it, or publish to a folder (outputs.hub_repo: ./folder)"
        )
    tries = attempts_of(e)
    after = f" after {tries} attempts" if tries > 1 else ""
    return PublishError(f"publishing to '{repo_id}' failed{after}: {scrub(f'{type(e).__name__}: {e}', token)}")


def push_to_hub(
    spec: RunSpec,
    plan: RunPlan,
    status: JobStatus,
    result: JobResult,
    gguf: GgufFiles | None,
    evaluation: EvaluationResult | None = None,
) -> PublishedModel:

    outputs = spec.outputs
    if not outputs.hub_repo:
        return PublishedModel(
            outcome=StageOutcome(
                stage="push_to_hub",
                status="skipped",
                detail="outputs.hub_repo is not set; the model stays in the run folder",
            )
        )
    kind, target = publish_target(outputs.hub_repo)
    from tasks.core.locks import publish_lock

    with publish_lock(target):
        return _publish(spec, plan, status, result, gguf, kind, target, evaluation)


def _publish(
    spec: RunSpec,
    plan: RunPlan,
    status: JobStatus,
    result: JobResult,
    gguf: GgufFiles | None,
    kind: Literal["folder", "hub"],
    target: str,
    evaluation: EvaluationResult | None = None,
) -> PublishedModel:
    from tasks.export.model_card import loss_curve_png, model_card

    outputs = spec.outputs
    if gguf is not None and gguf.files and not all(g.passed for g in gguf.files):
        failed = [g.quant for g in gguf.files if not g.passed]
        note = f"; GGUF files that failed their smoke test are left out: {', '.join(failed)}"
    else:
        note = ""
    run_dir = Path(plan.run_dir)
    png = loss_curve_png(status, run_dir / "loss.png", f"{plan.run_name}: training loss")
    repo_name = target if kind == "hub" else Path(target).name
    card = model_card(
        spec,
        plan,
        status,
        result,
        gguf,
        repo_name,
        "loss.png" if png else None,
        status.cost_usd,
        outputs.license,
        evaluation,
    )
    release = stage_release(run_dir, result, gguf, card, png)
    if kind == "folder":
        written, removed = publish_to_folder(release, Path(target))
        detail = f"published to folder {target}: {len(written)} file(s) written, {len(removed)} removed{note}"
        return PublishedModel(
            outcome=StageOutcome(stage="push_to_hub", status="passed", detail=detail),
            repo=target,
            url=Path(target).as_uri(),
            files=record(Path(target), [Path(target)]),
        )
    token = resolve_token()
    url = publish_to_hub(release, target, outputs.private, token, f"finetune-flow run {plan.run_name}")
    detail = f"published to the Hub as {'private' if outputs.private else 'public'} repo {target}{note}"
    return PublishedModel(
        outcome=StageOutcome(stage="push_to_hub", status="passed", detail=detail), repo=target, url=url
    )
