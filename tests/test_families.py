"""Planning for the families people fine-tune, from their real config.json files
(tests/data/configs/): parameter counts as published, MoE experts, LoRA targets per
architecture, and llama.cpp's converter knowing each one."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.planning import plan_run
from tasks.core.spec import parse_spec
from tasks.export.gguf import converted_architectures, converter_architectures
from tasks.plan.memory import Architecture
from tests.helpers import EXAMPLES, REPO

CONFIGS = REPO / "tests" / "data" / "configs"

# (config, parameters as the model card states them, one unit of its last digit: cards round or truncate)
PUBLISHED = [
    ("llama-3.2-1b", 1.23e9, 0.01e9),
    ("llama-3.2-3b", 3.21e9, 0.01e9),
    ("llama-3.1-8b", 8.03e9, 0.01e9),
    ("llama-3.1-70b", 70.6e9, 0.1e9),
    ("qwen2.5-0.5b", 0.49e9, 0.01e9),
    ("qwen2.5-7b", 7.61e9, 0.01e9),
    ("qwen3-0.6b", 0.6e9, 0.1e9),
    ("qwen3-8b", 8.2e9, 0.1e9),
    ("qwen3-30b-a3b", 30.5e9, 0.1e9),
    ("gemma-2-2b", 2.61e9, 0.01e9),
    ("gemma-2-9b", 9.24e9, 0.01e9),
    ("mixtral-8x7b", 46.7e9, 0.1e9),
    ("phi-3-mini", 3.8e9, 0.1e9),
    ("phi-4", 14.7e9, 0.1e9),
    ("gemma-3-1b", 1.0e9, 0.1e9),  # the -it config: the same architecture as -pt
    ("smollm2-135m", 135e6, 1e6),
]


def _config(name: str):
    from transformers import AutoConfig

    data = json.loads((CONFIGS / f"{name}.json").read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


@pytest.mark.parametrize(("name", "published", "precision"), PUBLISHED)
def test_parameter_counts_equal_the_published_ones(name, published, precision):
    assert abs(Architecture.from_config(_config(name)).params - published) <= precision


@pytest.mark.parametrize(("name", "active"), [("mixtral-8x7b", 12.9e9), ("qwen3-30b-a3b", 3.3e9)])
def test_moe_models_hold_every_expert_but_compute_with_top_k(name, active):
    arch = Architecture.from_config(_config(name))
    assert arch.expert_params > 0.9 * arch.params  # every expert is in memory
    # FLOPs come from the active weights: the card's "active" figure (it includes the embeddings)
    assert 0.85 * active < arch.matmul_params < 1.05 * active
    assert arch.lora_targets == ("k_proj", "o_proj", "q_proj", "v_proj")  # no router, no fused experts


def test_lora_targets_default_to_each_architectures_own_linears():
    assert Architecture.from_config(_config("llama-3.2-1b")).lora_targets == (
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    )
    assert Architecture.from_config(_config("phi-3-mini")).lora_targets == (
        "down_proj",
        "gate_up_proj",
        "o_proj",
        "qkv_proj",
    )
    assert Architecture.from_config(_config("gemma-2-2b"), target_modules=["q_proj"]).lora_targets == ("q_proj",)


def test_llama_cpps_converter_knows_every_family():
    known = converter_architectures()
    assert known is not None, "the converter is installed by `make install`"
    for name, _, _ in PUBLISHED:
        assert _config(name).architectures[0] in known, name


@pytest.mark.parametrize("name", ["mixtral-8x7b", "gemma-2-9b", "qwen3-8b"])
def test_a_config_only_folder_of_each_family_plans_on_a_gpu_with_its_lora_targets(name, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", folder / "config.json")
    spec = parse_spec(
        {"dataset": str(EXAMPLES / "data" / "sft_chat.jsonl"), "model": str(folder), "backend": "hf-jobs", "name": name}
    )
    plan = plan_run(spec)
    h = plan.hardware
    held = h.estimated_peak_memory_gb * h.processes + sum(h.host_memory_breakdown_gb.values())  # GPUs and hosts
    assert h.accelerator and held > h.parameters * 0.5 / 2**30  # at least 4-bit weights, somewhere
    assert plan.dataset.token_counts == "estimated"
    assert plan.script.config["lora"]["target_modules"] == h.lora_target_modules
    if name == "mixtral-8x7b":
        assert h.expert_parameters > 40e9 and "gate" not in h.lora_target_modules


# vision-language models: the parameter counts their Hub pages state, to the parameter
VISION = [
    ("qwen2.5-vl-3b", 3_754_622_976, 4),
    ("qwen2.5-vl-7b", 8_292_166_656, 4),
    ("smolvlm-256m", 256_484_928, 16),
    ("gemma-3-4b", 4_300_079_472, 16),
]


@pytest.mark.parametrize(("name", "published", "patches"), VISION)
def test_vision_models_are_counted_exactly_with_their_towers_frozen_and_left_out_of_lora(name, published, patches):
    arch = Architecture.from_config(_config(name))
    assert arch.params == published
    assert 0.02 * published < arch.tower_params < 0.4 * published  # the tower and its projector
    assert arch.tower_matmul_params > 0.9 * arch.tower_params and arch.patches_per_image_token == patches
    assert isinstance(arch.lora_targets, str) and "(?!.*(vision|visual" in arch.lora_targets  # the language model's
    tables = converted_architectures(_config(name))  # the language model's GGUF, and the --mmproj projector
    assert all(arch in converter_architectures(table) for table, arch in tables.items()) and len(tables) == 2


def _vision_folder(name: str, tmp_path) -> str:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", folder / "config.json")
    for extra in ("preprocessor_config.json", "processor_config.json"):
        if (CONFIGS / f"{name}.{extra}").exists():
            shutil.copy(CONFIGS / f"{name}.{extra}", folder / extra)
    return str(folder)


def _photos(tmp_path, size: tuple[int, int]) -> str:
    from PIL import Image

    rows = [json.loads(line) for line in (EXAMPLES / "data" / "shapes_vqa.jsonl").read_text().splitlines()][:40]
    Image.new("RGB", size, (40, 80, 220)).save(tmp_path / "photo.png")
    for row in rows:
        row["images"] = ["photo.png"]
    (tmp_path / "photos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "photos.jsonl")


@pytest.mark.parametrize(("name", "tokens"), [("qwen2.5-vl-7b", 999), ("gemma-3-4b", 256)])
def test_a_vision_config_folder_plans_its_photos_image_tokens_on_a_gpu(name, tokens, tmp_path):
    """A 1024x768 photo: Qwen2.5-VL resizes it to 1036x756 (multiples of 28), 74 x 54 patches of 14
    merged 2x2 = 999 tokens; Gemma 3 pools any image to 256."""
    spec = parse_spec(
        {"dataset": _photos(tmp_path, (1024, 768)), "model": _vision_folder(name, tmp_path), "backend": "hf-jobs"}
        | {"name": name}
    )
    plan = plan_run(spec)
    images = plan.dataset.images
    assert images.tokens_per_image_min == images.tokens_per_image_max == tokens and images.images == 40
    h = plan.hardware
    assert h.accelerator and h.frozen_tower_parameters == Architecture.from_config(_config(name)).tower_params
    assert "vision tower (forward)" in h.memory_breakdown_gb
    assert plan.script.config["vision"] is True and plan.script.config["lora"]["target_modules"].startswith("^(?!")


def test_a_vision_config_whose_image_tokens_need_its_tokenizer_refuses_image_rows_and_says_why(tmp_path):
    from tasks.data.validate import DatasetValidationError

    spec = parse_spec(
        {"dataset": _photos(tmp_path, (512, 512)), "model": _vision_folder("smolvlm-256m", tmp_path)}
        | {"backend": "hf-jobs", "name": "smolvlm"}
    )
    with pytest.raises(DatasetValidationError, match="the tokens they become cannot be counted: .*tokenizer"):
        plan_run(spec)
