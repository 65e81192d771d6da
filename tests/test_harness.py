"""Task evaluations through lm-evaluation-harness: what cannot run offline is refused at plan
time with the file and the fix, data files travel with the script, and the before/after
comparison pairs the harness's per-row scores."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tasks.evaluate.harness import TaskError, check_with_harness, compare_task, prepare_tasks, task_work
from tests.helpers import EXAMPLES

TASK = EXAMPLES / "evals" / "answer_form.yaml"


def _task(tmp_path, **changes) -> str:
    config = {**yaml.safe_load(TASK.read_text()), **changes}
    config["dataset_kwargs"] = {"data_files": {"test": str(EXAMPLES / "data" / "answer_form.jsonl")}}
    config.update({k: v for k, v in changes.items() if k == "dataset_kwargs"})
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_data_files_are_copied_into_the_run_folder_and_named_relative_to_the_script(tmp_path):
    (task,) = prepare_tasks([str(TASK)], tmp_path / "run")
    assert task.name == "answer_form" and task.rows == 40 and task.metric == "acc" and task.higher_is_better
    assert task.config["dataset_kwargs"]["data_files"] == {"test": ["evals/answer_form/test-0.jsonl"]}
    copied = tmp_path / "run" / "evals" / "answer_form" / "test-0.jsonl"
    assert copied.read_bytes() == (EXAMPLES / "data" / "answer_form.jsonl").read_bytes()
    scored, generated = task_work([str(TASK)])
    assert scored > 40 * 10 and generated == 0  # four choices scored per row, nothing generated


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset_path": "allenai/ai2_arc"}, "reads dataset_path 'allenai/ai2_arc'; task evaluations run offline"),
        ({"include": "arc_easy.yaml"}, "`include:` is not supported"),
        ({"test_split": "validation"}, "the split to evaluate .* must be a key of dataset_kwargs.data_files"),
        ({"output_type": "ranking"}, "output_type 'ranking' is not one of"),
        (
            {"dataset_kwargs": {"data_files": {"test": "/nowhere/x.jsonl"}}},
            "data file /nowhere/x.jsonl .* does not exist",
        ),
    ],
)
def test_what_cannot_run_offline_is_refused_with_the_fix(tmp_path, change, message):
    with pytest.raises(TaskError, match=message):
        prepare_tasks([_task(tmp_path, **change)], tmp_path / "run")


def test_python_code_by_reference_and_missing_files_are_refused(tmp_path):
    coded = tmp_path / "coded.yaml"
    coded.write_text(TASK.read_text() + "process_docs: !function utils.process_docs\n")
    with pytest.raises(TaskError, match=r"YAML tags \(!function\) point at Python code"):
        prepare_tasks([str(coded)], tmp_path / "run")
    with pytest.raises(TaskError, match="does not exist; give an lm-evaluation-harness task YAML"):
        prepare_tasks([str(tmp_path / "missing.yaml")], tmp_path / "run")


def test_the_harness_renders_the_first_row_before_any_spend(tmp_path):
    pytest.importorskip("lm_eval")
    broken = _task(tmp_path, doc_to_text="{{questionz}}")
    tasks = prepare_tasks([broken], tmp_path / "run")
    with pytest.raises(TaskError, match="the harness cannot use it: UndefinedError: 'questionz' is undefined"):
        check_with_harness(tasks, tmp_path / "run")
    import datasets

    check_with_harness(prepare_tasks([str(TASK)], tmp_path / "ok"), tmp_path / "ok")  # the shipped task renders
    assert datasets.config.HF_HUB_OFFLINE is False  # put back: a Hub dataset loaded later still can be


def test_the_task_verdict_pairs_rows_and_respects_the_direction_of_the_metric():
    record = {"metric": "acc", "before": [0, 0, 1, 0, 0, 1, 0, 0], "after": [1, 1, 1, 1, 1, 1, 0, 1]}
    better = compare_task("t", record, 2.0)
    assert (better.verdict, better.base, better.trained) == ("improved", 0.25, 0.875)
    assert compare_task("t", {**record, "after": record["before"]}, 2.0).verdict == "no change"
    lower = compare_task("t", {**record, "metric": "perplexity", "higher_is_better": False}, 2.0)
    assert lower.verdict == "worse" and lower.change < 0  # a rise of a lower-is-better metric


def test_a_spec_names_tasks_relative_to_itself(tmp_path):
    from tasks.core.spec import load_spec

    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("published"))
    spec = load_spec(tmp_path / "examples" / "sft-tiny.yaml")
    assert spec.evaluation.tasks == [str(tmp_path / "examples" / "evals" / "answer_form.yaml")]
    assert json.loads(json.dumps(spec.model_dump()))["evaluation"]["tasks"]
