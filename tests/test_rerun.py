"""Re-running a run: what is done and still valid is not done again (Prefect's result
persistence and cache policies, keyed by each stage's inputs); what changed runs again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.sft import sft
from tasks.core.spec import load_spec
from tests.helpers import EXAMPLES


def _spec(tmp_path: Path, name: str, **over: object) -> object:
    """The tiny SFT example, cut to 8 steps (what is tested here is what runs again, not learning)."""
    outputs = {"hub_repo": f"file://{tmp_path / 'published' / name}", "gguf": ["q8_0"], **over.pop("outputs", {})}  # type: ignore[dict-item]
    training = {"max_steps": 8, "save_steps": 4, "logging_steps": 2}
    return load_spec(EXAMPLES / "sft-tiny.yaml", {"name": name, "outputs": outputs, "training": training, **over})


def _statuses(summary: object) -> dict[str, str]:
    return {s.stage: s.status for s in summary.stages}  # type: ignore[attr-defined]


def _training_starts(run_dir: Path) -> int:
    """How many trainings ran to the end in this run folder (its log is appended to)."""
    log = run_dir / "logs" / "train.log"
    return log.read_text().count("training finished:") if log.exists() else 0


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_a_crash_after_training_does_not_retrain_and_a_finished_run_only_reports(
    trains, prefect_server, tmp_path, monkeypatch
):
    import tasks.export.gguf

    real_convert = tasks.export.gguf.convert_to_gguf

    def crash(*args: object, **kwargs: object) -> float:
        raise RuntimeError("injected crash in the GGUF converter")

    monkeypatch.setattr(tasks.export.gguf, "convert_to_gguf", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        sft(spec=_spec(tmp_path, "rerun"))
    run_dir = tmp_path / "runs" / "rerun"
    report = json.loads((run_dir / "report.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]}["convert_gguf"] == "failed"
    first_job = report["job"]["job_id"]
    assert _training_starts(run_dir) == 1

    # fixed, and run again: the training is taken from its persisted result
    monkeypatch.setattr(tasks.export.gguf, "convert_to_gguf", real_convert)
    summary = sft(spec=_spec(tmp_path, "rerun"))
    status = _statuses(summary)
    assert summary.error is None
    assert status["check_account"] == status["approve"] == "skipped"
    assert status["submit_job"] == status["monitor"] == status["fetch_artifacts"] == "cached"
    assert status["convert_gguf"] == status["smoke_test_gguf"] == status["push_to_hub"] == "passed"
    assert summary.job.job_id == first_job and _training_starts(run_dir) == 1
    assert summary.job.steps == summary.job.max_steps  # the report still has the whole training

    # finished, run again: nothing runs, everything is reported
    again = sft(spec=_spec(tmp_path, "rerun"))
    assert again.error is None
    assert {k: v for k, v in _statuses(again).items() if k not in ("check_account", "approve")} == {
        **{s: "passed" for s in ("validate_dataset", "select_hardware", "estimate_cost", "build_script", "evaluate")},
        **{s: "cached" for s in ("submit_job", "monitor", "fetch_artifacts", "convert_gguf")},
        **{s: "cached" for s in ("smoke_test_gguf", "push_to_hub")},
    }
    assert "(from an earlier run)" in (run_dir / "report.md").read_text()
    assert _training_starts(run_dir) == 1

    # an output damaged since: the stage that made it runs again, and only that one
    gguf = Path(again.gguf.files[0].path)
    gguf.write_bytes(gguf.read_bytes()[:1000])  # cut short
    repaired = sft(spec=_spec(tmp_path, "rerun"))
    status = _statuses(repaired)
    assert status["monitor"] == "cached" and status["convert_gguf"] == "passed"
    from tasks.core.manifest import sha256_file

    assert sha256_file(gguf) == repaired.gguf.files[0].sha256 == again.gguf.files[0].sha256

    # a changed output setting: training is kept, GGUF export runs for the new types
    more = sft(spec=_spec(tmp_path, "rerun", outputs={"gguf": ["q8_0", "q4_k_m"]}))
    status = _statuses(more)
    assert status["monitor"] == "cached" and status["convert_gguf"] == "passed"
    assert [f.quant for f in more.gguf.files] == ["q8_0", "q4_k_m"]
    assert (run_dir / "spec.previous.yaml").exists()


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_changed_data_trains_again_and_the_earlier_training_is_set_aside(trains, prefect_server, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = (EXAMPLES / "data" / "sft_chat.jsonl").read_text().splitlines()
    data.write_text("\n".join(rows[:200]) + "\n")
    first = sft(spec=_spec(tmp_path, "changed", dataset=str(data), outputs={"gguf": []}))
    assert first.error is None
    data.write_text("\n".join(rows[200:]) + "\n")  # same file, other rows
    second = sft(spec=_spec(tmp_path, "changed", dataset=str(data), outputs={"gguf": []}))
    status = _statuses(second)
    assert status["monitor"] == "passed" and second.job.job_id != first.job.job_id
    assert second.job.losses[0].step == 2, "trained afresh, not resumed from the other data's checkpoints"
    run_dir = Path(second.run_dir)
    aside = list((run_dir / "superseded").iterdir())
    assert len(aside) == 1 and (aside[0] / "model" / "config.json").exists()
    assert (aside[0] / "checkpoints").exists()
