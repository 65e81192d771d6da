"""Publishing: the release layout, the model card, the local-folder target, token hygiene."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.core.hub_access import scrub
from tasks.export.hub import PublishError, publish_target, publish_to_folder, publish_to_hub


def test_targets_are_hub_ids_or_folders(tmp_path):
    assert publish_target("me/my-model") == ("hub", "me/my-model")
    assert publish_target(f"file://{tmp_path}/out") == ("folder", str(tmp_path / "out"))
    assert publish_target("./out")[0] == "folder" and publish_target("/abs/x")[0] == "folder"
    with pytest.raises(PublishError, match="neither a Hub repo id"):
        publish_target("no spaces allowed")


def _release(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_a_folder_publish_copies_only_what_changed_and_removes_stale_files(tmp_path):
    target = tmp_path / "target"
    first = _release(tmp_path / "r1", {"README.md": b"card", "model.safetensors": b"w" * 1000, "gguf/a.gguf": b"g"})
    written, removed = publish_to_folder(first, target)
    assert sorted(written) == ["README.md", "gguf/a.gguf", "model.safetensors"] and removed == []
    again, removed = publish_to_folder(first, target)
    assert again == [] and removed == []
    second = _release(tmp_path / "r2", {"README.md": b"card v2", "model.safetensors": b"w" * 1000})
    written, removed = publish_to_folder(second, target)
    assert written == ["README.md"] and removed == ["gguf/a.gguf"]
    assert (target / "README.md").read_bytes() == b"card v2"
    assert not list(target.rglob("*.partial"))
    # the release it replaced is kept, whole, next to it
    previous = tmp_path / "target.previous"
    assert (previous / "README.md").read_bytes() == b"card" and (previous / "gguf" / "a.gguf").read_bytes() == b"g"
    publish_to_folder(second, target)  # nothing changed: the previous release stays the previous one
    assert (previous / "README.md").read_bytes() == b"card"


def test_the_token_is_scrubbed_and_a_missing_token_is_explained(tmp_path, monkeypatch):
    assert scrub("401 for hf_secret123 at url", "hf_secret123") == "401 for *** at url"
    with pytest.raises(PublishError, match="no Hugging Face token .* set HF_TOKEN"):
        publish_to_hub(tmp_path, "me/model", True, None, "msg")


def test_the_model_card_has_hub_metadata_and_run_instructions(tmp_path):
    from tasks.core.spec import parse_spec
    from tasks.export.model_card import card_metadata
    from tasks.export.modelfile import modelfile
    from tests.helpers import CHAT

    spec = parse_spec({"dataset": "someone/chats", "model": "Qwen/Qwen2.5-0.5B", "lora": True})

    class Plan:  # only the fields card_metadata reads
        class hardware:
            use_lora = True

        class script:
            config: dict = {}  # a text model's (a vision model's says "vision": True)

    meta = card_metadata(spec, Plan, None, "apache-2.0")
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["datasets"] == ["someone/chats"]
    assert {"peft", "lora", "sft", "trl"} <= set(meta["tags"]) and "gguf" not in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert yaml.safe_load(yaml.safe_dump(meta)) == meta
    local = card_metadata(parse_spec({"dataset": CHAT}), Plan, None, "mit")
    assert "base_model" not in local and "datasets" not in local  # a local path is no Hub id

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}')
    text = modelfile("tiny-q4_k_m.gguf", model_dir)
    assert text.startswith("FROM ./tiny-q4_k_m.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>{{ .Role }}" in text
