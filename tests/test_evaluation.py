"""Did it help? The held-out split, the before/after verdict and the publish gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.data.validate import HeldOut, SplitWriter
from tasks.evaluate.verdict import EvaluationError, blocks_publish, judge


def _sft(losses: list[float]) -> dict:
    return {"per_row": [{"loss": x, "tokens": 10} for x in losses], "generations": [{"prompt": "p", "text": "t"}]}


def test_the_same_scores_before_and_after_are_no_change():
    same = _sft([2.0, 2.5, 1.5, 3.0])
    result = judge("sft", {"before": same, "after": same, "seconds": 1.0})
    assert (result.verdict, result.change, result.noise_band) == ("no change", 0.0, 0.0)
    assert result.metrics[0].base == result.metrics[0].trained == pytest.approx(2.25)


def test_a_clear_drop_in_loss_is_improved_and_a_rise_is_worse():
    base = _sft([2.0, 2.5, 1.5, 3.0, 2.2, 2.8])
    better = _sft([1.0, 1.6, 0.4, 2.1, 1.2, 1.7])
    improved = judge("sft", {"before": base, "after": better})
    assert improved.verdict == "improved" and improved.change == pytest.approx(1.0, abs=0.01)
    assert improved.metrics[1].name == "perplexity" and improved.metrics[1].trained < improved.metrics[1].base
    assert improved.generations[0].base == improved.generations[0].trained == "t"
    worse = judge("sft", {"before": better, "after": base})
    assert worse.verdict == "worse" and worse.relative_change < 0
    assert blocks_publish(worse, 0.0) and "Nothing was published" in blocks_publish(worse, 0.0)
    assert blocks_publish(worse, None) is None and blocks_publish(worse, 10.0) is None  # within the allowed share
    assert blocks_publish(improved, 0.0) is None


def test_changes_within_the_noise_band_are_no_change():
    base = _sft([2.0, 2.5, 1.5, 3.0])
    noisy = _sft([2.3, 2.2, 1.8, 2.7])  # up and down by 0.3: the mean moves 0, the band is wide
    assert judge("sft", {"before": base, "after": noisy}).verdict == "no change"


def test_dpo_is_judged_on_the_margin_and_grpo_on_greedy_rewards():
    dpo = judge(
        "dpo",
        {
            "before": {"per_row": [{"margin": m} for m in (-0.2, 0.1, -0.1, 0.0)]},
            "after": {"per_row": [{"margin": m} for m in (1.0, 1.3, 0.8, 1.1)]},
        },
    )
    assert dpo.verdict == "improved" and dpo.metrics[0].name == "preference accuracy"
    assert (dpo.metrics[0].base, dpo.metrics[0].trained) == (0.25, 1.0)

    def rows(greedy: list[float]) -> dict:
        return {"per_row": [{"exact/greedy": g, "exact/sampled": 0.0} for g in greedy]}

    grpo = judge("grpo", {"before": rows([0, 0, 1, 0]), "after": rows([1, 1, 1, 1])})
    assert grpo.verdict == "improved" and grpo.primary == "sum of greedy rewards"
    assert {m.name for m in grpo.metrics} == {"exact/greedy (mean)", "exact/sampled (mean)"}


def test_a_record_without_both_models_is_refused():
    with pytest.raises(EvaluationError, match="did not evaluate both models"):
        judge("sft", {"before": _sft([1.0])})
    with pytest.raises(EvaluationError, match="not the same held-out rows"):
        judge("sft", {"before": _sft([1.0, 2.0]), "after": _sft([1.0])})


def _split(tmp_path: Path, rows: int, held_out: HeldOut) -> tuple[list[int], list[int]]:
    writer = SplitWriter(tmp_path, held_out)
    writer.write([json.dumps({"i": i}).encode() for i in range(rows)])
    writer.finish()
    read = lambda p: [json.loads(line)["i"] for line in p.read_text().splitlines()]  # noqa: E731
    assert not list(tmp_path.glob("*.tmp"))
    return read(tmp_path / "train.jsonl"), read(tmp_path / "heldout.jsonl")


def test_held_out_rows_are_a_seeded_random_choice(tmp_path):
    train, held = _split(tmp_path / "a", 1000, HeldOut(share=0.05, maximum=64, seed=7))
    assert len(held) == 50 and sorted(train + held) == list(range(1000))
    assert train == sorted(train)  # training rows keep their order
    assert held != list(range(950, 1000))  # not simply the last rows
    assert _split(tmp_path / "b", 1000, HeldOut(share=0.05, maximum=64, seed=7))[1] == held  # seeded
    assert _split(tmp_path / "c", 1000, HeldOut(share=0.05, maximum=64, seed=8))[1] != held
    assert len(_split(tmp_path / "d", 10_000, HeldOut(share=0.05, maximum=64))[1]) == 64  # capped
    assert len(_split(tmp_path / "e", 1000, HeldOut(share=25))[1]) == 25  # a count
    assert _split(tmp_path / "f", 30, HeldOut())[1] == []  # too few rows to spare any
    assert len(_split(tmp_path / "g", 30, HeldOut(share=5))[1]) == 5  # unless a count is asked for


def test_rows_scored_and_answered_in_batches_equal_each_row_alone(tiny_model_path):
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import REPO

    loader = importlib.util.spec_from_file_location("script", REPO / "training" / "templates" / "finetune_eval.py")
    script = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(script)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    chat = (REPO / "examples" / "data" / "sft_chat.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in chat[:12]] + [{"text": "plain text " * n} for n in (1, 9)]  # spread lengths
    settings = {"max_new_tokens": 6, "generations": 3}
    alone = script.evaluate_model(
        model, tokenizer, rows, [], {**settings, "measure": "completion_loss", "batch_size": 1}
    )
    batched = script.evaluate_model(
        model, tokenizer, rows, [], {**settings, "measure": "completion_loss", "batch_size": 5}
    )
    for a, b in zip(alone["per_row"], batched["per_row"], strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert alone["generations"] == batched["generations"]
    pairs = [json.loads(line) for line in (REPO / "examples" / "data" / "dpo_pairs.jsonl").read_text().splitlines()[:6]]
    one = script.evaluate_model(
        model, tokenizer, pairs, [], {**settings, "measure": "preference_margin", "batch_size": 1, "generations": 0}
    )
    four = script.evaluate_model(
        model, tokenizer, pairs, [], {**settings, "measure": "preference_margin", "batch_size": 4, "generations": 0}
    )
    assert [r["margin"] for r in one["per_row"]] == pytest.approx([r["margin"] for r in four["per_row"]], abs=1e-4)


def test_held_out_rows_are_cut_where_the_trainer_cuts_them(tiny_model_path):
    """A row longer than the training's max_length is scored on its first max_length tokens (what
    training saw; memory the plan sized) and a prompt to answer keeps its last ones."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import REPO

    loader = importlib.util.spec_from_file_location("script", REPO / "training" / "templates" / "finetune_eval.py")
    script = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(script)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt, answer = "Say it.", " seven" * 100
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    [(logp, n)] = script.completion_logprobs(model, tokenizer, [(prompt, answer)], 1, cut=40)
    ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"][:40]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[start - 1 :].sum()
    assert n == 40 - start and logp == pytest.approx(float(expected), abs=1e-3)
    assert script.completion_logprobs(model, tokenizer, [(prompt, answer)], 1)[0][1] > 100  # uncut without one

    long_prompt = "one two three " * 50 + "Say it."
    tail = tokenizer.decode(tokenizer(long_prompt, add_special_tokens=False)["input_ids"][-12:])
    cut = script.generate_many(model, tokenizer, [long_prompt], 4, False, 1.0, 1, cut=12)
    assert cut == script.generate_many(model, tokenizer, [tail], 4, False, 1.0, 1)
    assert tokenizer.truncation_side == "right"  # the tokenizer is left as it was


def test_a_diverged_model_scoring_nan_is_worse_and_stops_the_publish():
    base = _sft([2.0, 2.5, 1.5, 3.0])
    diverged = _sft([1.0, float("nan"), 1.2, float("inf")])  # finite rows look better, two are broken
    result = judge("sft", {"before": base, "after": diverged})
    assert result.verdict == "worse" and result.non_finite_rows == 2 and result.rows == 4
    assert "NaN or infinity on 2" in result.sentence() and blocks_publish(result, 0.5)
    everything = judge("sft", {"before": base, "after": _sft([float("nan")] * 4)})
    assert everything.verdict == "worse" and everything.non_finite_rows == 4


def test_a_task_that_gets_worse_stops_the_publish_even_when_the_held_out_rows_improve():
    from tasks.evaluate.verdict import judge_record

    record = {
        "before": _sft([2.0, 2.5, 1.5, 3.0, 2.2, 2.8]),
        "after": _sft([1.0, 1.6, 0.4, 2.1, 1.2, 1.7]),
        "tasks": {
            "before": {"general": {"metric": "acc", "per_row": [1, 1, 1, 1, 1, 0, 1, 1]}},
            "after": {"general": {"metric": "acc", "per_row": [0, 0, 1, 0, 0, 0, 0, 1]}},
        },
    }
    result = judge_record("sft", record)
    assert result.verdict == "improved" and result.tasks[0].verdict == "worse"
    assert "worse than its base on task general: acc 0.875 -> 0.25" in blocks_publish(result, 0.1)
    assert blocks_publish(result, None) is None and blocks_publish(result, 0.9) is None
