"""Vision-language SFT: rows with images recognised as users have them, every image checked
before spend (row and path named), and image tokens counted by the model's own processor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli.run import main as run_main
from flows.planning import plan_run
from flows.sft import sft
from tasks.core.spec import load_spec
from tasks.data.formats import recognise
from tasks.data.validate import DatasetValidationError
from tests.helpers import EXAMPLES

SHAPES = EXAMPLES / "data" / "shapes_vqa.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _shapes_copy(tmp_path: Path, rows: int = 60) -> tuple[Path, list[dict]]:
    """The shipped rows and their images in a folder of the test's own."""
    shutil.copytree(EXAMPLES / "data" / "shapes", tmp_path / "shapes")
    return tmp_path / "vqa.jsonl", _rows(SHAPES)[:rows]


def _plan(dataset: Path, model: str = "tiny-vl", **over):
    return plan_run(load_spec(EXAMPLES / "sft-vision-tiny.yaml", {"dataset": str(dataset), "model": model, **over}))


def test_the_tiny_vision_model_counts_image_tokens_as_its_processor_lays_them_out(tiny_vlm_path):
    from PIL import Image

    from tasks.data.vision import image_tokens_for

    tokens = image_tokens_for(tiny_vlm_path)
    processor = tokens.processor
    for size in [(100, 80), (112, 112), (40, 40), (1000, 600)]:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False
        )
        ids = processor(text=[text], images=[Image.new("RGB", size)], return_tensors="pt")["input_ids"][0].tolist()
        assert ids.count(processor.image_token_id) == tokens(size), size
    assert tokens((100, 80)) == 12 and tokens((112, 112)) == 16  # 56x56 to 112x112 pixels: 4 to 16 tokens


def test_images_with_conversations_llava_rows_and_image_folders_are_recognised():
    shipped = recognise(_rows(SHAPES), "sft")
    assert shipped.verdict == "READY" and shipped.candidates[0].trains_as == "vision"
    llava = [
        {
            "id": "1",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        }
    ]
    found = recognise(llava, "sft")
    assert found.verdict == "NEEDS MAPPING" and found.candidates[0].conversion == "llava"
    folder = [{"image": {"bytes": None, "path": "/x/a.png"}, "question": "What colour?", "answer": "Red."}]
    found = recognise(folder, "sft")
    assert found.candidates[0].conversion == "image_text"
    assert found.candidates[0].columns == {"completion": "answer", "prompt": "question"}
    assert recognise(_rows(SHAPES), "dpo").verdict == "INCOMPATIBLE"


def test_the_shipped_set_plans_with_its_image_tokens_and_a_frozen_vision_tower(tiny_vlm_path):
    plan = plan_run(load_spec(EXAMPLES / "sft-vision-tiny.yaml", {"name": "vision-plan"}))
    report = plan.dataset
    assert report.format == "vision" and report.rows == 120
    assert report.images.images == 120 and report.images.tokens_per_image_mean == 16  # 112x112 shapes
    assert report.images.rows_without_images == 0
    # every row's length counts its 16 image tokens: the chat text alone is about 40
    assert report.tokens.min > 16 + 30
    data = Path(report.prepared_path).parent
    staged = [json.loads(line)["images"][0] for line in Path(report.prepared_path).read_text().splitlines()]
    assert all((data / p).is_file() for p in staged) and len(list((data / "images").iterdir())) == 120
    assert plan.hardware.frozen_tower_parameters > 0
    assert plan.hardware.trainable_parameters == plan.hardware.parameters - plan.hardware.frozen_tower_parameters
    assert plan.script.config["vision"] is True


def test_broken_image_rows_are_refused_at_the_dry_run_with_the_row_and_path(tiny_vlm_path, tmp_path, capsys):
    dataset, rows = _shapes_copy(tmp_path)
    rows[3]["images"] = ["shapes/missing.png"]  # line 4
    rows[7]["messages"][0]["content"].append({"type": "image"})  # line 8: two image parts, one image
    (tmp_path / "shapes" / "0010.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # line 11
    (tmp_path / "shapes" / "0012.png").write_bytes((EXAMPLES / "data" / "shapes" / "0012.png").read_bytes()[:200])
    _write(dataset, rows)
    code = run_main(
        "sft", sft, plan_run, ["--spec", str(EXAMPLES / "sft-vision-tiny.yaml"), "--dataset", str(dataset), "--dry-run"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "4 bad row(s) for format 'vision'" in err
    assert "rows 4: image file not found (row 4: 'shapes/missing.png', looked for at" in err
    assert "rows 8: the image parts in messages must match the images given" in err and "2 image part(s), 1" in err
    # a file that is no image, and one cut short
    assert "rows 11, 13: Pillow cannot open the image (row 11: 'shapes/0010.png': not in an image format" in err
    run = next((tmp_path / "runs").iterdir())
    assert not (run / "data" / "train.jsonl").exists() and not (run / "data" / "images").exists()
    assert not (run / "data" / "images.partial").exists()


def test_a_text_model_refuses_image_rows_and_a_vision_model_takes_text_rows_with_a_warning(tiny_vlm_path, tmp_path):
    with pytest.raises(DatasetValidationError, match=r"the model is text-only \(Qwen2ForCausalLM\)"):
        _plan(SHAPES, model="tiny")
    plan = _plan(EXAMPLES / "data" / "sft_chat.jsonl", name="text-on-vision")
    assert plan.dataset.format == "messages" and plan.dataset.images is None
    assert any("vision-language model (Qwen2_5_VLForConditionalGeneration)" in w for w in plan.dataset.warnings)


def test_text_only_rows_in_a_vision_set_are_counted_and_large_images_warned(tiny_vlm_path, tmp_path):
    from PIL import Image

    dataset, rows = _shapes_copy(tmp_path)
    rows[0] = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        ],
        "images": [],
    }
    Image.new("RGB", (900, 700), (220, 40, 40)).save(tmp_path / "big.png")
    rows[1]["images"] = [str(tmp_path / "big.png")]  # an absolute path
    rows[2] = {"messages": rows[0]["messages"]}  # a row without the images key: text only too
    plan = _plan(_write(dataset, rows), name="mixed")
    images = plan.dataset.images
    assert images.rows_without_images == 2 and images.images == 58 and images.far_larger == 1
    assert "row 2: 900x700 px" in images.far_larger_example
    assert any("2 row(s) have no image" in w for w in plan.dataset.warnings)
    assert any("resized down" in w for w in plan.dataset.warnings)


def test_llava_rows_and_an_image_folder_train_as_conversations_with_images(tiny_vlm_path, tmp_path):
    dataset, rows = _shapes_copy(tmp_path, rows=45)
    llava = [
        {
            "image": r["images"][0],
            "conversations": [
                {"from": "human", "value": "<image>\n" + r["messages"][0]["content"][1]["text"]},
                {"from": "gpt", "value": r["messages"][1]["content"][0]["text"]},
            ],
        }
        for r in rows
    ]
    plan = _plan(_write(dataset, llava), name="llava", conversion="llava")
    assert plan.dataset.format == "vision" and plan.dataset.images.images == 45
    first = json.loads(Path(plan.dataset.prepared_path).read_text().splitlines()[0])
    assert first["messages"][0]["content"][0] == {"type": "image"} and len(first["images"]) == 1

    folder = tmp_path / "folder"
    shutil.copytree(tmp_path / "shapes", folder)
    _write(
        folder / "metadata.jsonl",
        [
            {
                "file_name": Path(r["images"][0]).name,
                "question": r["messages"][0]["content"][1]["text"],
                "answer": r["messages"][1]["content"][0]["text"],
            }
            for r in rows
        ],
    )
    plan = _plan(folder, name="folder", conversion="image_text", columns={"completion": "answer", "prompt": "question"})
    assert plan.dataset.format == "vision" and plan.dataset.images.images == 45


def test_the_tiny_vision_model_learns_the_shapes_and_its_gguf_pair_answers_an_image_question(
    tiny_vlm_path, trains, prefect_server, tmp_path, monkeypatch
):
    published = tmp_path / "published"
    overrides = {"name": "vision", "training": {"num_train_epochs": 2}, "outputs": {"hub_repo": str(published)}}
    summary = sft(spec=load_spec(EXAMPLES / "sft-vision-tiny.yaml", overrides))
    assert summary.error is None and all(s.status == "passed" for s in summary.stages), summary.stages
    assert summary.evaluation.verdict == "improved"
    projector = summary.gguf.mmproj
    assert projector.passed and projector.image_answer and projector.image_prompt_tokens > 16  # the image's 16 tokens
    assert projector.image_answer_agreement >= 0.5, (projector.image_answer, projector.hf_image_answer)
    names = {p.name for p in (published / "gguf").iterdir()}
    assert {"vision-f16.gguf", "vision-q8_0.gguf", "vision-mmproj-f16.gguf", "Modelfile"} <= names
    assert "FROM ./vision-mmproj-f16.gguf" in (published / "gguf" / "Modelfile").read_text()
    assert {"processor_config.json", "chat_template.jinja", "example.png"} <= {p.name for p in published.iterdir()}
    card = (published / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "![a held-out image](example.png)" in card
    assert "llama-mtmd-cli -m gguf/vision-q8_0.gguf --mmproj gguf/vision-mmproj-f16.gguf --image example.png" in card

    # the card's transformers example, as written, against the published folder
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('from_pretrained("published")') == 2  # the folder's name, as the repo's
    snippet = snippet.replace('from_pretrained("published")', f'from_pretrained("{published}")')
    from training.templates.finetune_vision import patch_no_torchvision

    patch_no_torchvision()  # no torchvision here (docs/vision-language-probe.md)
    monkeypatch.chdir(published)
    printed: list[str] = []
    exec(compile(snippet, "README.md", "exec"), {"print": printed.append})
    assert printed and printed[0].strip() == projector.hf_image_answer.strip()


def test_the_vision_tower_stays_frozen_unless_the_spec_trains_it_beside_the_adapter(tiny_vlm_path, tmp_path):
    frozen = _plan(SHAPES, name="frozen", lora=True)
    h = frozen.hardware
    assert h.frozen_tower_parameters > 0 and h.trained_tower_parameters == 0
    assert "modules_to_save" not in frozen.script.config["lora"] and frozen.script.config["frozen"]
    trained = _plan(SHAPES, name="trained", lora=True, vision_tower="trained", training={"max_steps": 1})
    t = trained.hardware
    assert t.trained_tower_parameters == h.frozen_tower_parameters and t.frozen_tower_parameters == 0
    assert t.trainable_parameters == h.trainable_parameters + h.frozen_tower_parameters
    assert "vision tower activations" in t.memory_breakdown_gb and trained.cost.estimated_flops > 0
    assert trained.script.config["lora"]["modules_to_save"] == ["visual"] and trained.script.config["frozen"] == []
    # trained by hand: test_dpo_pairs_after_their_pictures_are_planned_and_scored_with_their_images


def test_image_parts_that_name_their_images_and_a_single_image_path_are_taken_as_they_are(tiny_vlm_path, tmp_path):
    dataset, rows = _shapes_copy(tmp_path, rows=45)
    inline = []
    for i, r in enumerate(rows):
        question, answer = r["messages"][0]["content"][1]["text"], r["messages"][1]["content"][0]["text"]
        image = (
            {"type": "image", "image": r["images"][0]}
            if i % 2
            else {"type": "image_url", "image_url": {"url": r["images"][0]}}  # OpenAI's form
        )
        inline.append(
            {
                "messages": [
                    {"role": "user", "content": [image, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    found = recognise(inline, "sft")
    assert found.verdict == "NEEDS MAPPING" and found.candidates[0].conversion == "inline_images"
    plan = _plan(_write(dataset, inline), name="inline", conversion="inline_images")
    assert plan.dataset.format == "vision" and plan.dataset.images.images == 45
    single = [{**r, "images": r["images"][0]} for r in rows]  # one path, not a list
    plan = _plan(_write(tmp_path / "single.jsonl", single), name="single")
    assert plan.dataset.images.images == 45


def test_image_rows_in_a_form_or_for_a_method_that_cannot_read_them_are_refused_not_stripped():
    pairs = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
            "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "Blue."}],
            "images": ["a.png"],
        }
    ]
    assert recognise(pairs, "dpo").candidates[0].trains_as == "vision_preference"  # TRL's DPO reads them
    for method in ("orpo", "kto", "reward", "grpo"):
        verdict = recognise(pairs, method)
        assert verdict.verdict == "INCOMPATIBLE" and f"{method} does not train on images yet" in verdict.why
    sft = recognise(pairs, "sft")  # not the chosen answers alone, without their picture
    assert sft.verdict == "INCOMPATIBLE" and "not in a form sft reads with them" in sft.why


def test_dpo_pairs_after_their_pictures_are_planned_and_scored_with_their_images(tiny_vlm_path, trains, tmp_path):
    import subprocess
    import sys

    from tasks.core.spec import load_spec as load

    # with the tower trained beside the adapter: one run by hand checks both
    plan = plan_run(load(EXAMPLES / "dpo-vision-tiny.yaml", {"name": "dpo-vision-plan", "vision_tower": "trained"}))
    assert plan.dataset.format == "vision_preference" and plan.dataset.images.images == 120
    assert plan.script.config["vision"] is True and "vision tower activations" in plan.hardware.memory_breakdown_gb
    out = tmp_path / "by-hand"
    proc = subprocess.run(
        [sys.executable, plan.script.path, "--max-steps", "2", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    evaluation = json.loads((out / "train_result.json").read_text())["evaluation"]
    assert len(evaluation["before"]["per_row"]) == 20 and all("margin" in r for r in evaluation["after"]["per_row"])
    assert evaluation["after"]["generations"][0]["prompt"].count("<|image_pad|>") == 1  # asked with its picture
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "np") as saved:
        assert any(".visual." in key for key in saved.keys())  # the tower, trained whole beside the adapter


@pytest.mark.slow  # a minute or more alone: `make test-slow`, run by CI after `make test`
def test_dpo_on_the_tiny_vision_model_prefers_answers_to_hedges_through_the_lifecycle(
    tiny_vlm_path, trains, prefect_server, tmp_path
):
    from flows.dpo import dpo

    published = tmp_path / "published"
    summary = dpo(
        spec=load_spec(
            EXAMPLES / "dpo-vision-tiny.yaml", {"name": "dpo-vision", "outputs": {"hub_repo": str(published)}}
        )
    )
    assert summary.error is None and all(s.status == "passed" for s in summary.stages), summary.stages
    assert summary.evaluation.verdict == "improved" and summary.evaluation.rows == 20
    assert summary.gguf.mmproj.passed and (published / "gguf" / "dpo-vision-mmproj-f16.gguf").exists()


def test_images_held_as_bytes_in_parquet_are_checked_and_staged(tiny_vlm_path, tmp_path):
    """What the `datasets` Image feature writes to Parquet (and a Hub dataset streams): {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(SHAPES)[:45]
    folder = EXAMPLES / "data"
    table = pa.table(
        {
            "messages": pa.array([r["messages"] for r in rows]),
            "images": pa.array([[{"bytes": (folder / r["images"][0]).read_bytes(), "path": None}] for r in rows]),
        }
    )
    pq.write_table(table, tmp_path / "bytes.parquet")
    plan = _plan(tmp_path / "bytes.parquet", name="bytes")
    assert plan.dataset.format == "vision" and plan.dataset.images.images == 45
    data = Path(plan.dataset.prepared_path).parent
    first = json.loads(Path(plan.dataset.prepared_path).read_text().splitlines()[0])
    assert (data / first["images"][0]).read_bytes() in {(folder / r["images"][0]).read_bytes() for r in rows}
