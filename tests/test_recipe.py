"""Recipes: stages written once with shared defaults, checked as run specs, planned and
priced together before anything runs, then run in order from each other's models against
one budget."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from cli.recipe import main as recipe_main
from flows.recipe import plan_stages, recipe_flow, run_recipe
from tasks.core.recipe import chained_stage, load_recipe, parse_recipe, remaining_budget
from tasks.core.rundir import runs_root
from tasks.core.spec import Budget, SpecError, load_spec
from tasks.data.validate import DatasetValidationError
from tasks.stages.approval import BudgetExceeded
from tests.helpers import EXAMPLES

CHAT = str(EXAMPLES / "data" / "sft_chat.jsonl")


def _two_sft(**extra) -> dict:
    return {
        "name": "chain",
        "budget": {"max_usd": 5, "auto_approve_usd": 1},
        "defaults": {"training": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64}},
        "stages": [
            {"name": "first", "method": "sft", "dataset": CHAT},
            {"name": "second", "method": "sft", "dataset": CHAT, "training": {"learning_rate": 1e-4}},
        ],
        **extra,
    }


def test_stages_take_the_defaults_the_recipes_model_and_budget_and_only_the_last_makes_gguf_files():
    recipe = parse_recipe(_two_sft(outputs={"hub_repo": "/tmp/x/final", "gguf": ["q8_0"]}))
    first, second = recipe.stages
    assert first.training == {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64}
    assert second.training["learning_rate"] == 1e-4 and second.training["max_steps"] == 2  # merged, not replaced
    assert first.model == second.model == "tiny" and first.budget == second.budget == recipe.budget
    assert first.outputs.gguf == [] and first.outputs.hub_repo is None
    assert second.outputs.gguf == ["q8_0"] and second.outputs.hub_repo == "/tmp/x/final"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": []}, "non-empty list"),
        ({"stages": [{"method": "sft", "dataset": CHAT, "model": "x/y"}]}, "stage 1 .*`model` is not a stage field"),
        ({"stages": [{"method": "sft", "dataset": CHAT, "budget": {}}]}, "the budget is the recipe's"),
        ({"stages": [{"method": "sft", "dataset": CHAT, "lr": 1}]}, r"(?s)stage 1 \(1-sft\).*unknown field 'lr'"),
        ({"stages": [{"name": "a", "dataset": CHAT}, {"name": "a", "dataset": CHAT}]}, "stage names must differ"),
        ({"name": "Bad Name"}, "at most 40 lowercase"),
        ({"stages": [{"name": "a-very-long-stage-name-indeed", "dataset": CHAT}]}, "stage names must be 1-23"),
        ({"steps": []}, r"unknown recipe field\(s\) \['steps'\]"),
    ],
)
def test_a_bad_recipe_names_the_stage_and_the_field(change, message):
    with pytest.raises(SpecError, match=message):
        parse_recipe({**_two_sft(), **change})


def test_paths_are_relative_to_the_recipe_file_and_set_reaches_one_stage(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("published"))
    recipe = load_recipe(tmp_path / "examples" / "grpo-tiny.yaml", {"warmup": {"training": {"max_steps": 3}}})
    warmup, grpo = recipe.stages
    assert warmup.dataset == str(tmp_path / "examples" / "data" / "sft_chat.jsonl")
    assert warmup.training["max_steps"] == 3 and grpo.training["max_steps"] == 80
    assert grpo.outputs.hub_repo == str(tmp_path / "examples" / "published" / "grpo-tiny")


def test_a_recipe_and_a_run_spec_each_point_at_the_other_command(tmp_path):
    with pytest.raises(SpecError, match="is a recipe.*python -m flows.recipe"):
        load_spec(EXAMPLES / "grpo-tiny.yaml")
    with pytest.raises(SpecError, match="not a recipe.*python -m flows.<method>"):
        load_recipe(EXAMPLES / "sft-tiny.yaml")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"method": "grpo", "dataset": CHAT, "requires": ["warmup.yaml"]}))
    with pytest.raises(SpecError, match="'requires' was replaced by recipes"):
        load_spec(old)


def test_each_stage_spends_what_the_stages_before_left_and_is_judged_against_the_base():
    recipe = parse_recipe(_two_sft())
    assert remaining_budget(Budget(max_usd=5, auto_approve_usd=1), 0.4) == Budget(max_usd=4.6, auto_approve_usd=0.6)
    assert remaining_budget(Budget(max_usd=5, auto_approve_usd=1), 2.0) == Budget(max_usd=3, auto_approve_usd=0)
    first = chained_stage(recipe, "chain", 0, "tiny", 0.0)
    second = chained_stage(recipe, "chain", 1, "/runs/chain-first/model", 0.4)
    assert (first.name, second.name) == ("chain-first", "chain-second")
    assert second.model == "/runs/chain-first/model" and second.budget.max_usd == pytest.approx(4.6)
    assert first.evaluation.baseline is None and second.evaluation.baseline == "tiny"


def test_every_stage_is_planned_before_anything_runs(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    recipe = parse_recipe(
        {**_two_sft(), "stages": [{"name": "first", "dataset": CHAT}, {"name": "second", "dataset": str(broken)}]}
    )
    with pytest.raises(DatasetValidationError, match=r"^stage 'second' \(sft\): .*broken.jsonl"):
        run_recipe(recipe)  # the second stage's data fails before the first trains
    assert not (runs_root() / "chain-first" / "job.json").exists()


def test_a_chain_over_budget_is_refused_before_anything_runs():
    expensive = {"backend": "hf-jobs", "hardware": "a10g-small", "flavors": {"a10g-small": {"price_per_hour": 500.0}}}
    recipe = parse_recipe({**_two_sft(), "defaults": {**_two_sft()["defaults"], **expensive}})
    plans = plan_stages(recipe, "chain")
    assert all(p.cost.usd > 1 for p in plans) and "planned with the recipe's base tiny" in plans[1].notes[0]
    with pytest.raises(BudgetExceeded, match=r"stages are estimated at \$.* together \(first \$.*, second \$.*\)"):
        run_recipe(recipe)
    report = json.loads((runs_root() / "chain" / "report.json").read_text())
    assert report["error"].startswith("the recipe's stages are estimated")
    assert [s["status"] for s in report["stages"]] == ["planned", "planned"]
    assert not (runs_root() / "chain-first" / "job.json").exists()


def test_the_dry_run_prices_the_chain_as_json(capsys):
    assert (
        recipe_main(recipe_flow, ["--spec", str(EXAMPLES / "grpo-tiny.yaml"), "--dry-run", "--json", "--name", "plan"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [s["run_name"] for s in out["stages"]] == ["plan-warmup", "plan-grpo"]
    assert [s["status"] for s in out["stages"]] == ["planned", "planned"]
    assert out["estimated_usd"] == pytest.approx(sum(s["estimated_usd"] for s in out["stages"]))
    assert not (runs_root() / "plan-warmup" / "job.json").exists()
    from cli.status import main as status_main
    from tasks.run.jobs import run_state

    assert run_state(runs_root() / "plan")["state"] == "planned (dry run)"
    assert run_state(runs_root() / "plan-grpo")["state"] == "planned"
    assert status_main(["no-such-run"]) == 2 and "no run named 'no-such-run'" in capsys.readouterr().err


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_the_grpo_recipe_runs_with_one_command_each_stage_from_the_last_and_resumes_for_free(
    trains, prefect_server, tmp_path
):
    from prefect import get_client

    from tasks.run.monitor import read_trackio_metrics

    examples = tmp_path / "examples"  # a fresh copy: nothing published yet
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("published"))
    summary = recipe_flow(recipe=load_recipe(examples / "grpo-tiny.yaml", {"name": "rec"}))
    assert summary.error is None and [s.status for s in summary.stages] == ["passed", "passed"]
    warmup, grpo = summary.stages
    grpo_plan = json.loads((runs_root() / "rec-grpo" / "plan.json").read_text())
    assert grpo_plan["model_path"] == warmup.model_dir  # the second stage trained from the first's model
    assert grpo_plan["script"]["config"]["model"] == warmup.model_dir
    card = (examples / "published" / "grpo-tiny" / "README.md").read_text()
    assert "in a recipe that began from `tiny`" in card and "**Against the baseline tiny**" in card
    assert summary.final_model == grpo.model_dir and summary.published == str(examples / "published" / "grpo-tiny")
    script = (runs_root() / "rec-grpo" / "train.py").read_text()  # rewards travel next to the script
    rewards = (runs_root() / "rec-grpo" / "finetune_rewards" / "rewards.py").read_text()
    assert "'trainer': 'GRPOTrainer'" in script and "def exact_answer(completions, answer" in rewards
    assert "'module': 'finetune_rewards.rewards'" in script and "'function': 'exact_answer'" in script
    for source in (script, rewards):
        assert "from training" not in source and "import training" not in source

    # GRPO learnt: the reward rose in training, and both verdicts say so on the 20 held-out prompts
    rows = read_trackio_metrics(runs_root() / "rec-grpo" / "trackio", "rec-grpo", "rec-grpo")
    rewards = [r["train/reward"] for r in rows if "train/reward" in r]
    assert len(rewards) >= 10 and sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards
    assert warmup.evaluation.verdict == "improved" and warmup.evaluation.baseline is None
    assert grpo.evaluation.verdict == "improved" and grpo.evaluation.rows == 20
    assert grpo.evaluation.baseline.verdict == "improved" and grpo.evaluation.baseline_model == "tiny"
    report = (runs_root() / "rec" / "report.md").read_text()
    assert "| 2 | grpo (`rec-grpo`) | grpo | stage warmup | passed |" in report and report.count("improved") >= 3

    # one parent flow run, each stage a child flow run named after its run
    with get_client(sync_client=True) as client:
        runs = {r.name: r for r in client.read_flow_runs()}
    assert {"rec", "rec-warmup", "rec-grpo"} <= set(runs)
    assert runs["rec"].parent_task_run_id is None
    assert runs["rec-warmup"].parent_task_run_id is not None and runs["rec-grpo"].parent_task_run_id is not None

    # followed from another terminal: the recipe and its stages
    from tasks.run.jobs import run_state

    state = run_state(runs_root() / "rec")
    assert (state["kind"], state["state"]) == ("recipe", "finished")
    assert [(s["stage"], s["state"], s["verdict"]) for s in state["stages"]] == [
        ("warmup", "finished", "improved"),
        ("grpo", "finished", "improved"),
    ]

    # the same recipe again: both trainings are reused, nothing is paid twice
    again = recipe_flow(recipe=load_recipe(examples / "grpo-tiny.yaml", {"name": "rec"}))
    assert [s.paid_before for s in again.stages] == [True, True] and again.spent_usd == 0
    assert again.stages[1].evaluation.verdict == "improved"


def test_the_first_failure_stops_the_chain_and_the_report_says_where(monkeypatch):
    import flows.recipe as module

    def failing(method):
        def run(spec, **options):
            raise RuntimeError(f"job of {spec.name} failed: out of memory")

        return run

    monkeypatch.setattr(module, "method_flow", failing)
    with pytest.raises(RuntimeError, match="chain-first failed"):
        run_recipe(parse_recipe(_two_sft()))
    report = json.loads((runs_root() / "chain" / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["failed", "not run"]
    assert report["error"] == "stage first: job of chain-first failed: out of memory"
    assert report["final_model"] is None and "FAILED" in (runs_root() / "chain" / "report.md").read_text()


def test_rlhf_chains_a_reward_model_into_grpo_which_starts_from_the_warm_up(tmp_path):
    """SFT, then a reward model, then GRPO scored by it (examples/rlhf-tiny.yaml): the reward
    stage is no starting point, so GRPO starts from the warm-up's model; `stage:rm` becomes the
    reward stage's run folder, which is checked when GRPO starts (it does not exist at planning)."""
    from tasks.core.recipe import chat_model_from

    recipe = load_recipe(EXAMPLES / "rlhf-tiny.yaml", {"name": "rlhf"})
    assert [chat_model_from(recipe, i) for i in range(3)] == [None, 0, 0]  # rm and rl both from the warm-up
    rl = chained_stage(recipe, "rlhf", 2, "/runs/rlhf-warmup/model", 0.0)
    assert rl.rewards == [str(runs_root() / "rlhf-rm"), "answer_format"]
    plans = plan_stages(recipe, "rlhf")  # before anything has trained
    assert "starts from the model stage 'warmup' trains" in plans[2].notes[0]
    assert [r["model"] for r in plans[2].script.config["rewards"] if r.get("model")] == [
        str(runs_root() / "rlhf-rm" / "model")
    ]
    assert "no GGUF files" in " ".join(plans[1].notes)


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        (["stage:warmup"], "reward 'stage:warmup' must name an earlier stage with method: reward"),
        (["stage:later"], "the earlier ones that train a reward model: rm"),
    ],
)
def test_a_stage_reward_must_name_an_earlier_reward_model_stage(rewards, message):
    recipe = yaml.safe_load((EXAMPLES / "rlhf-tiny.yaml").read_text())
    recipe["stages"][2]["rewards"] = rewards
    with pytest.raises(SpecError, match=message):
        parse_recipe(recipe)
