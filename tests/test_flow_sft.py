"""The SFT lifecycle end to end on the embedded default, under a real Prefect server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.planning import plan_run
from flows.sft import sft
from tasks.core.spec import load_spec, parse_spec
from tests.helpers import EXAMPLES, SFT_SECRET


def test_the_whole_sft_lifecycle_trains_and_leaves_every_output(sft_run, monkeypatch, capsys):
    # the demo's SFT, trained once for the session (conftest.sft_run) with a token set that must
    # never appear in any output
    summary, published = sft_run.summary, sft_run.published
    assert sft_run.elapsed_s < 600  # a hang guard; about a minute on an idle 2-core machine (benchmarks time it)

    assert summary.error is None
    status = {s.stage: s.status for s in summary.stages}
    assert [s.stage for s in summary.stages] == [
        "validate_dataset",
        "select_hardware",
        "estimate_cost",
        "build_script",
        "check_account",
        "approve",
        "submit_job",
        "monitor",
        "fetch_artifacts",
        "evaluate",
        "convert_gguf",
        "smoke_test_gguf",
        "push_to_hub",
    ]
    assert all(v == "passed" for v in status.values()), summary.stages

    job = summary.job
    assert job.state == "completed" and job.steps == job.max_steps == 48  # 380 training rows / batch 8
    first, last = job.losses[0].loss, job.losses[-1].loss
    assert last < first * 0.3, (first, last)  # the loss fell clearly

    run_dir = Path(summary.run_dir)
    for name in [
        "spec.yaml",
        "plan.json",
        "train.py",
        "data/train.jsonl",
        "logs/train.log",
        "report.md",
        "report.json",
        "train_result.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ]:
        assert (run_dir / name).exists(), name
    assert any((run_dir / "trackio").glob("*.db"))
    assert list((run_dir / "checkpoints").glob("checkpoint-*"))
    report = (run_dir / "report.md").read_text()
    assert "| smoke_test_gguf | passed |" in report and "loss:" in report
    # what the training took, measured by the script, next to the plan's estimates
    measured = summary.result.measured
    assert measured.optimizer_steps == 48 and measured.tokens > 0 and measured.peak_memory_gb > 0.1
    assert "## Estimate vs measured" in report and "| real tokens per second |" in report
    # the yardstick is the machine's limit: useful FLOPs per second over the matmul the script
    # measured right after training (the planner's own measurement is the estimate's peak)
    cost = summary.plan.cost
    assert measured.matmul_peak_flops > 1e9
    share = cost.useful_flops_per_token * measured.tokens_per_s / measured.matmul_peak_flops
    assert 0.01 < share < 1 and "| useful FLOPs per second, share of the peak |" in report
    assert f"{share:.1%} |" in report and "this machine's matmul measured when the run was planned" in report
    assert "measured, by the script right after it trained" in report
    # and the script says the same where it ran, for whoever runs it by hand
    assert f"{share:.1%} of this CPU's float32 matmul peak" in (run_dir / "logs" / "train.log").read_text()
    # did it help? the trained model against the base, on the 20 held-out rows
    evaluation = summary.evaluation
    assert evaluation.verdict == "improved" and evaluation.rows == 20, evaluation
    assert evaluation.metrics[0].trained < evaluation.metrics[0].base  # completion loss fell
    assert len(evaluation.generations) == 3 and "## Did it help?" in report and "**Verdict: improved.**" in report
    assert json.loads((run_dir / "report.json").read_text())["evaluation"]["verdict"] == "improved"
    (form,) = evaluation.tasks  # the demo's lm-evaluation-harness task, on its local file
    assert (form.task, form.metric, form.rows, form.verdict) == ("answer_form", "acc", 40, "improved")
    assert form.trained > form.base and "| answer_form | acc | 40 |" in report  # measured: 0 -> 1

    # every GGUF file loads in llama.cpp, tokenizes as the HF tokenizer does and agrees with the HF model
    assert [f.quant for f in summary.gguf.files] == ["f16", "q8_0", "q5_k_m", "q4_k_m"]
    for f in summary.gguf.files:
        assert f.passed, f.problems
        assert f.tokenization_matches == f.tokenization_checked > 10
        assert f.top1_agreement >= 0.9 and f.perplexity < f.hf_perplexity * 1.1
    # the local publish target holds exactly the Hub repo's layout
    names = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert {
        "README.md",
        "loss.png",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "gguf/Modelfile",
        "gguf/flow-test-q4_k_m.gguf",
        "gguf/flow-test-f16.gguf",
    } <= names
    card = (published / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-generation" in card and "ollama create" in card
    assert "| `flow-test-q8_0.gguf` | q8_0 |" in card
    assert "## Evaluation against the model it started from" in card and "**Verdict: improved.**" in card
    # the verdict checked by hand on the published files, as the card says how
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scores = json.loads((published / "evaluation.json").read_text())
    assert scores["rows"] == 20 and len(scores["before"]) == len(scores["after"]) == 20
    tok, model = AutoTokenizer.from_pretrained(published), AutoModelForCausalLM.from_pretrained(published)
    row = json.loads((run_dir / "data" / "heldout.jsonl").read_text().splitlines()[0])
    prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    ids = tok(tok.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False).input_ids
    start = len(tok(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1 : -1].float()
    by_hand = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[start:])[:, None]).mean().item()
    assert by_hand == pytest.approx(scores["after"][0]["loss"], rel=1e-4)
    # followed from another terminal, by name
    from cli.status import main as status_main

    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(sft_run.runs))
    assert status_main(["flow-test", "--json"]) == 0
    state = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (state["state"], state["stage"], state["verdict"]) == ("finished", "push_to_hub", "improved")
    assert state["report"].endswith("flow-test/report.md") and state["stages"]["evaluate"] == "passed"
    secret = SFT_SECRET
    for path in [*run_dir.rglob("*"), *published.rglob("*")]:
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )
    out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0]).count("+") >= 2  # it answers in the trained "a + b = c" form

    from prefect.artifacts import Artifact

    assert Artifact.get("report-flow-test") is not None
    loss_table = json.loads(Artifact.get("loss-flow-test").data)
    assert len(loss_table) == len(job.losses)


def test_broken_data_fails_before_anything_is_submitted(prefect_server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    spec = parse_spec({"dataset": str(bad), "name": "broken"})
    with pytest.raises(Exception, match="rows 2: turns must go"):
        sft(spec=spec)
    from tasks.core.rundir import runs_root

    assert not (runs_root() / "broken" / "job.json").exists()
    assert not (runs_root() / "broken" / "train.py").exists()


def test_the_generated_script_runs_by_hand_with_lora_and_merges(trains, tmp_path):
    spec = load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "by-hand", "lora": True, "training": {"learning_rate": 1e-2}})
    plan = plan_run(spec)
    out = tmp_path / "by-hand"
    proc = subprocess.run(
        [sys.executable, plan.script.path, "--max-steps", "10", "--output-dir", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["global_step"] == 10 and result["lora"] is True
    assert (out / "adapter" / "adapter_config.json").exists()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(plan.model_path)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[5, 17, 42, 9]])
    torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())
