"""Several training processes through the generated launch, proven on this machine's CPU: the
tiny SFT as 2 data-parallel processes over gloo, started as every backend starts the script
(`python train.py` becomes `accelerate launch --config_file accelerate.yaml train.py`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from flows.sft import sft
from tasks.spec import parse_spec
from tests.conftest import EXAMPLES


def test_the_tiny_sft_trains_as_two_processes_and_saves_a_model_that_loads(prefect_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(
        {
            "model": "tiny",
            "dataset": str(EXAMPLES / "data" / "sft_chat.jsonl"),
            "distributed": {"processes": 2},
            "training": {
                "max_steps": 8,
                "learning_rate": 3.0e-3,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "max_length": 96,
                "logging_steps": 2,
            },
            "evaluation": {"generations": 1},
            "outputs": {"gguf": []},
            "name": "two-processes",
        }
    )
    summary = sft(spec=spec)
    assert summary.error is None and summary.job.state == "completed"
    plan, run_dir = summary.plan, Path(summary.plan.run_dir)
    assert (plan.hardware.processes, plan.hardware.strategy) == (2, "ddp")

    launch = yaml.safe_load((run_dir / "accelerate.yaml").read_text())
    assert launch["num_processes"] == 2 and launch["use_cpu"] is True
    log = (run_dir / "logs" / "train.log").read_text()
    assert "accelerate launch --config_file accelerate.yaml train.py" in log
    for rank in (0, 1):  # both processes trained every optimizer step, each on its own rows
        assert f"process {rank} of 2 trained 8 optimizer steps of 4 x 2 rows" in log

    measured = summary.result.measured
    assert measured.processes == 2 and measured.global_batch == 2 * 4 * 2
    result = json.loads((run_dir / "train_result.json").read_text())
    rows = plan.dataset.train_rows
    # an epoch took 24 optimizer steps of 16 rows (one process alone would have taken 48 of 8)
    assert round(8 / result["metrics"]["epoch"]) == math.ceil(rows / measured.global_batch) == 24
    assert summary.evaluation is not None and summary.evaluation.verdict == "improved"

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = tokenizer("1+2=", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    report = (run_dir / "report.md").read_text()
    assert "2 processes (ddp, world size 2, global batch 16)" in report
    assert "real tokens per second per process" in report
