"""The fast path: which speed choices the planner makes where, that the spec overrides each,
that they reach the generated script, that packed rows stay apart, and that the fast path
learns what the defaults learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.planning import plan_run
from tasks.core.spec import SpecError, load_spec
from tasks.plan import speed
from tasks.plan.flavors import load_catalogue
from tasks.plan.speed import choose_speed, padding_overhead
from tasks.report.render import plan_markdown
from tests.helpers import EXAMPLES

CATALOGUE = load_catalogue()


def _choose(
    method="sft",
    training=None,
    flavor="a100-large",
    model_type="qwen2",
    local=False,
    over=0,
    measured=True,
    whole_epochs=True,
):
    return choose_speed(
        method,
        training or {},
        CATALOGUE.get(flavor),
        model_type,
        local,
        over,
        every_row_measured=measured,
        whole_epochs=whole_epochs,
    )


def test_on_a_cpu_rows_keep_their_order_in_float32_without_workers():
    plan = _choose(flavor="cpu-upgrade")
    assert (plan.batching, plan.attention, plan.liger) == ("padded", "sdpa", False)
    assert plan.arguments == {
        "model_init_kwargs": {"attn_implementation": "sdpa"},
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "optim": "adamw_torch_fused",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
    }
    assert "Triton GPU kernels" in plan.reason("liger")


def test_on_gpus_bf16_or_fp16_by_generation_the_fused_adamw_and_pinned_workers():
    a100 = _choose(flavor="a100-large")  # 12 vCPUs
    assert a100.arguments["bf16"] and not a100.arguments["fp16"] and a100.arguments["optim"] == "adamw_torch_fused"
    assert (a100.arguments["dataloader_num_workers"], a100.arguments["dataloader_pin_memory"]) == (3, True)
    assert a100.batching == "grouped" and "flash-attn is not in the job's dependencies" in a100.reason("attention")
    t4 = _choose(flavor="t4-small")
    assert t4.arguments["fp16"] and not t4.arguments["bf16"] and "loss scaling" in t4.reason("precision")
    assert "T4: no FlashAttention" in t4.reason("attention")


def test_flash_attention_here_makes_batches_padding_free_unless_rows_would_go_uncut(monkeypatch):
    monkeypatch.setattr(speed, "flash_attention_installed", lambda: True)
    fast = _choose(flavor="a100-large", local=True)
    assert (fast.attention, fast.batching) == ("flash_attention_2", "padding_free")
    assert fast.arguments["padding_free"] is True and fast.arguments["max_length"] is None
    long_rows = _choose(flavor="a100-large", local=True, over=12)
    assert long_rows.batching == "grouped" and "12 rows exceed max_length" in long_rows.reason("batching")
    assert _choose(flavor="a100-large", local=False).attention == "sdpa"  # not in the job's image


def test_liger_kernels_only_where_installed_and_the_architecture_is_patched(monkeypatch):
    assert not _choose().liger and "not installed" in _choose().reason("liger")
    monkeypatch.setattr(speed, "liger_model_types", lambda: frozenset({"qwen2", "llama"}))
    assert _choose(model_type="qwen2").arguments["use_liger_kernel"] is True
    gemma = _choose(model_type="gemma")
    assert not gemma.liger and "does not patch the gemma architecture" in gemma.reason("liger")
    assert not _choose(flavor="cpu-basic").liger


def test_the_spec_overrides_every_choice():
    training = {
        "padding_free": True,
        "optim": "adamw_8bit",
        "bf16": False,
        "fp16": False,
        "use_liger_kernel": False,
        "dataloader_num_workers": 1,
        "model_init_kwargs": {"attn_implementation": "eager"},
    }
    plan = _choose(training=training, over=3)
    assert plan.batching == "padding_free" and plan.attention == "eager" and not plan.liger
    assert all(c.reason.startswith("set in the spec") for c in plan.choices if c.setting != "data loading")
    assert not set(plan.arguments) & set(training)  # the spec's own keys are left as given
    # TRL refuses padding-free without packing at a max_length: the uncut rows are said
    assert plan.arguments["max_length"] is None and "3 rows over max_length are not cut" in plan.reason("batching")


def test_a_run_stopped_within_its_first_epoch_keeps_rows_in_random_order():
    # grouped batches run longest to shortest within a mega-batch: an early stop would end on the
    # shortest rows (a 12-step warm-up grouped so left GRPO unable to learn)
    short = _choose(training={"max_length": 64}, over=0, whole_epochs=False)
    assert short.batching == "padding_free" and "max_steps ends the run within the first epoch" in short.reason(
        "batching"
    )
    assert short.arguments["padding_free"] is True
    assert short.arguments["max_length"] is None  # nothing reaches 64 tokens, so nothing is left uncut
    long_rows = _choose(over=5, whole_epochs=False)
    assert long_rows.batching == "padded" and not {"padding_free", "train_sampling_strategy"} & set(long_rows.arguments)
    sampled = _choose(over=0, whole_epochs=False, measured=False)  # a sample could miss one
    assert sampled.batching == "padded"


def test_dpo_and_grpo_keep_their_trainers_own_batching():
    assert _choose(method="dpo").batching == "padded" and "DPOTrainer" in _choose(method="dpo").reason("batching")
    assert _choose(method="grpo").batching == "padded"
    assert "train_sampling_strategy" not in _choose(method="dpo").arguments


def test_padding_overhead_is_simulated_on_the_measured_lengths():
    skewed = [20] * 60 + list(range(20, 1020, 25))  # most rows short, a long tail: 101 percentiles
    skewed = sorted(skewed)[:101]
    padded = padding_overhead(skewed, 5000, 1024, 8, 8, "padded")
    grouped = padding_overhead(skewed, 5000, 1024, 8, 8, "grouped")
    assert padded > 2 * grouped and 1.0 < grouped < 1.3
    assert padding_overhead(skewed, 5000, 1024, 8, 8, "padding_free") == 1.0
    assert padding_overhead([100] * 101, 5000, 1024, 8, 8, "padded") == 1.0  # equal lengths pad nothing
    assert padded == padding_overhead(skewed, 5000, 1024, 8, 8, "padded")  # seeded
    # grouping is weaker on a small dataset: fewer rows to sort within a mega-batch
    assert padding_overhead(skewed, 64, 1024, 8, 8, "grouped") > grouped


def test_the_planned_choices_reach_the_script_and_the_plan(tmp_path):
    spec = load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "speedy", "outputs": {"hub_repo": None}})
    plan = plan_run(spec, runs_root=tmp_path)
    training = plan.script.config["training"]
    assert "train_sampling_strategy" not in training and training["optim"] == "adamw_torch_fused"
    assert training["model_init_kwargs"] == {"attn_implementation": "sdpa"}
    assert training["per_device_train_batch_size"] == plan.hardware.micro_batch == 8
    assert training["gradient_checkpointing"] is False and training["dataloader_num_workers"] == 0
    source = Path(plan.script.path).read_text()
    assert "'optim': 'adamw_torch_fused'" in source and "**init_kwargs" in source
    markdown = plan_markdown(plan)
    assert "## Speed" in markdown and "| batching | padded |" in markdown and "| batch | 8 x 1 |" in markdown
    saved = json.loads(plan.model_dump_json())
    assert saved["hardware"]["speed"]["batching"] == "padded"

    cut = load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "cut", "training": {"padding_free": True}})
    with pytest.raises(SpecError, match="padding_free without packing cannot cut rows at max_length 128"):
        plan_run(cut, runs_root=tmp_path)  # the example sets max_length: TRL would fail at the job's start
    whole = {"padding_free": True, "max_length": None}
    given = plan_run(load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "given", "training": whole}), runs_root=tmp_path)
    training = given.script.config["training"]
    assert training["padding_free"] is True and training["max_length"] is None
    assert "train_sampling_strategy" not in training and given.hardware.padding_overhead == 1.0
    # on a CPU padding-free rows attend one by one (finetune_attention.py), unless the spec chose the kernel
    assert training["model_init_kwargs"] == {"attn_implementation": "sdpa_rows"}
    chosen = {**whole, "model_init_kwargs": {"attn_implementation": "eager"}}
    kernel = plan_run(load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "kernel", "training": chosen}), runs_root=tmp_path)
    assert kernel.script.config["training"]["model_init_kwargs"] == {"attn_implementation": "eager"}


def test_on_a_cpu_the_batch_split_is_the_one_the_time_model_finds_fastest(tmp_path):
    from training.example_data import chat_rows_at_scale, write_jsonl_stream

    # the demo's rows are all 31-36 tokens: batching them costs no padding and saves forward passes
    demo = plan_run(load_spec(EXAMPLES / "sft-tiny.yaml", {"name": "demo"}), runs_root=tmp_path).hardware
    assert (demo.micro_batch, demo.accumulation) == (8, 1) and "fastest split on a CPU" in demo.batch_reason
    # realistic chat rows (most short, a long tail): one row per forward pass, so no padding at all
    write_jsonl_stream(chat_rows_at_scale(300, seed=1, spread="realistic"), tmp_path / "chat.jsonl")
    spread = load_spec(
        EXAMPLES / "sft-tiny.yaml",
        {"name": "spread", "dataset": str(tmp_path / "chat.jsonl"), "training": {"max_length": 1024}},
    )
    real = plan_run(spread, runs_root=tmp_path)
    assert (real.hardware.micro_batch, real.hardware.accumulation) == (1, 8) and real.hardware.padding_overhead == 1.0
    assert real.script.config["training"]["per_device_train_batch_size"] == 1
    # the spec fixes the split by giving gradient_accumulation_steps
    fixed = spread.model_copy(
        update={"name": "fixed", "training": {**spread.training, "gradient_accumulation_steps": 1}}
    )
    assert plan_run(fixed, runs_root=tmp_path).hardware.micro_batch == 8


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


def _rows(n: int, tokenizer) -> list[list[int]]:
    from training.example_data import chat_rows_at_scale

    out = []
    for row in chat_rows_at_scale(4 * n, seed=3, spread="realistic"):
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        if len(ids) <= 400:
            out.append(ids)
        if len(out) == n:
            return out
    raise AssertionError("not enough short rows")


def test_padding_free_and_padded_batches_keep_rows_apart(tiny):
    """Each row's logits in a batch equal its logits alone: no attention across rows, in a
    padding-free batch (TRL's collator: one sequence, positions restarting per row) or a padded one."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tokenizer = tiny
    rows = _rows(3, tokenizer)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r])).logits[0] for r in rows]
        flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
        assert flat["input_ids"].shape == (1, sum(map(len, rows)))
        assert flat["position_ids"][0, len(rows[0])] == 0  # positions restart at each row
        # as SFTTrainer.compute_loss calls it: without a KV cache (with one, transformers does not
        # look for packed rows in the position ids and attention crosses rows: measured)
        out = model(**{k: v for k, v in flat.items() if k != "labels"}, use_cache=False).logits[0]
        padded = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": r} for r in rows])
        batch = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    start = 0
    for i, r in enumerate(rows):
        torch.testing.assert_close(out[start : start + len(r)], alone[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batch[i, : len(r)], alone[i], atol=1e-4, rtol=1e-4)
        start += len(r)


def test_row_by_row_attention_gives_each_row_of_a_padding_free_batch_what_it_gets_alone(tiny_model_path):
    """The script's finetune_attention.py (attn_implementation sdpa_rows, padding-free batches on a
    CPU): the logits and the gradients of a batch from TRL's padding-free collator equal those of
    SDPA with transformers' block-diagonal mask, and each row's logits equal the row's alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from training.templates.finetune_attention import register

    register()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rows = _rows(4, tokenizer)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
    results = []
    for attention in ("sdpa_rows", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attention)
        out = model(**batch, use_cache=False)
        out.loss.backward()
        results.append((out.logits[0].detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone(), model))
    (rows_logits, rows_grad, model), (mask_logits, mask_grad, _) = results
    torch.testing.assert_close(rows_logits, mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows_grad, mask_grad, atol=1e-5, rtol=1e-4)
    start = 0
    with torch.no_grad():
        for r in rows:
            alone = model(input_ids=torch.tensor([r]), use_cache=False).logits[0]
            torch.testing.assert_close(rows_logits[start : start + len(r)], alone, atol=1e-4, rtol=1e-4)
            start += len(r)


def test_padding_free_batches_of_the_script_cut_rows_at_max_length_first(tiny_model_path, tmp_path):
    """The script's padding_free_batches: TRL tokenizes and cuts the rows at max_length as for
    padded batches, then its collator puts each micro-batch's rows end to end, positions
    restarting at each row (TRL's own padding_free refuses a max_length without packing)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.templates.train import padding_free_batches

    rows = [json.loads(line) for line in (EXAMPLES / "data" / "sft_chat.jsonl").read_text().splitlines()[:8]]
    config = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_length=16, use_cpu=True, report_to="none"
    )
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
    )
    padding_free_batches(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 8 * 16)  # every row was longer
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == list(range(0, 8 * 16, 16)) and batch["cu_seq_lens_q"].tolist() == [*starts, 8 * 16]


def _train(model_path: str, data: Path, out: Path, **speed_args) -> tuple[list[float], float]:
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.throughput import held_out_loss

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    config = trl.SFTConfig(
        output_dir=str(out),
        learning_rate=3e-3,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        **speed_args,
    )
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "cache"))
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    held = [json.loads(line) for line in (data.parent / "held.jsonl").read_text().splitlines()]
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], held_out_loss(model, tokenizer, held)


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_the_fast_path_learns_what_trl_defaults_learn(trains, tiny_model_path, tmp_path):
    """On the tiny model, an epoch of realistic chat rows (32 rows of mixed length, 4 steps of 8):
    padding-free batches, and micro-batches of one row with accumulation, give the defaults' losses
    step for step (the same rows in the same order, the same normalisation over the global batch),
    and grouping rows by length (another order) ends within 2% of the defaults' held-out loss
    (measured 0.2% apart)."""
    from training.example_data import chat_rows_at_scale, write_jsonl_stream

    rows = [r for r in chat_rows_at_scale(200, seed=5, spread="realistic") if len(json.dumps(r)) < 1000][:48]
    write_jsonl_stream(rows[:32], tmp_path / "train.jsonl")
    write_jsonl_stream(rows[32:], tmp_path / "held.jsonl")
    base = dict(per_device_train_batch_size=8, gradient_checkpointing=True)  # TRL's defaults
    default_steps, default_held = _train(tiny_model_path, tmp_path / "train.jsonl", tmp_path / "a", **base)
    free_steps, _ = _train(
        tiny_model_path,
        tmp_path / "train.jsonl",
        tmp_path / "b",
        per_device_train_batch_size=8,
        padding_free=True,
        max_length=None,
        gradient_checkpointing=False,
    )
    grouped_steps, grouped_held = _train(
        tiny_model_path,
        tmp_path / "train.jsonl",
        tmp_path / "c",
        per_device_train_batch_size=8,
        train_sampling_strategy="group_by_length",
        gradient_checkpointing=False,
        optim="adamw_torch",
    )
    single_steps, single_held = _train(
        tiny_model_path,
        tmp_path / "train.jsonl",
        tmp_path / "d",
        per_device_train_batch_size=1,  # what the planner chooses on a CPU for such rows
        gradient_accumulation_steps=8,
        gradient_checkpointing=False,
        optim="adamw_torch",
    )
    assert free_steps == pytest.approx(default_steps, rel=1e-3)
    assert single_steps == pytest.approx(default_steps, rel=1e-3) and single_held == pytest.approx(default_held, 1e-4)
    assert len(grouped_steps) == len(default_steps) == 4
    assert grouped_held == pytest.approx(default_held, rel=0.02)


def test_fused_kernels_the_plan_chose_travel_with_the_script_as_dependencies():
    from tasks.core.methods import SFT
    from tasks.plan.script import render_script

    fused = {"training": {"use_liger_kernel": True, "model_init_kwargs": {"attn_implementation": "flash_attention_2"}}}
    source = render_script(SFT, fused)
    assert '#   "liger-kernel' in source and '#   "flash-attn' in source  # pinned where installed here
    plain = render_script(SFT, {"training": {"model_init_kwargs": {"attn_implementation": "sdpa"}}})
    assert "liger-kernel" not in plain and "flash-attn" not in plain
