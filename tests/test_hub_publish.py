"""Publishing to the Hub through the real huggingface_hub client, against a local stand-in
of the Hub's HTTP API (tests/hub_standin.py): round trip, re-runs, cuts, refused tokens."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.core import hub_access
from tasks.export import hub
from tasks.export.hub import PublishError, publish_to_hub
from tests.hub_standin import HubStandin

TOKEN = "test-write-token-for-the-standin"
READ_ONLY = "test-read-token-for-the-standin"


@pytest.fixture(scope="module")
def standin():
    with HubStandin(require_token=TOKEN, readonly_tokens=(READ_ONLY,)) as server:
        yield server


@pytest.fixture(autouse=True)
def hub_env(standin, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    # publish_to_hub turns Xet off for any endpoint but huggingface.co (the stand-in speaks
    # git-LFS); the original value is restored after each test.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
    monkeypatch.setattr(hub, "RETRY_DELAYS_S", (0.1, 0.2, 0.3))
    standin.reset_counters()


def _release(root: Path, weights: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# model\n")
    (root / "config.json").write_text('{"model_type": "qwen2"}')
    (root / "model.safetensors").write_bytes(weights)
    (root / "gguf").mkdir(exist_ok=True)
    (root / "gguf" / "m-q4_k_m.gguf").write_bytes(b"GGUF" + weights[:1000])
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights(seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (12 * 1024 * 1024 // 32)  # 12 MiB: the LFS path


def test_publish_round_trip_private_by_default(standin, tmp_path):
    from huggingface_hub import HfApi

    release = _release(tmp_path / "release", _weights(1))
    url = publish_to_hub(release, "me/tiny-sft", True, TOKEN, "first")
    assert "/me/tiny-sft/commit/" in url
    api = HfApi(endpoint=standin.endpoint, token=TOKEN)
    assert api.model_info("me/tiny-sft").private is True
    files = sorted(api.list_repo_files("me/tiny-sft"))
    assert files == ["README.md", "config.json", "gguf/m-q4_k_m.gguf", "model.safetensors"]
    for name in files:
        local = api.hf_hub_download("me/tiny-sft", name, cache_dir=tmp_path / "dl")
        assert _sha(Path(local).read_bytes()) == _sha((release / name).read_bytes()), name
    assert standin.lfs_bytes_received >= 12 * 1024 * 1024  # the weights went the large-file way


def test_a_rerun_pushes_only_what_changed(standin, tmp_path):
    release = _release(tmp_path / "release", _weights(2))
    publish_to_hub(release, "me/rerun", True, TOKEN, "first")
    standin.reset_counters()
    publish_to_hub(release, "me/rerun", True, TOKEN, "unchanged")
    assert standin.lfs_bytes_received == 0 and standin.counts["commit"] == 0
    (release / "README.md").write_text("---\nlicense: mit\n---\n# changed card\n")
    standin.reset_counters()
    publish_to_hub(release, "me/rerun", True, TOKEN, "card only")
    assert standin.lfs_bytes_received == 0 and standin.counts["commit"] == 1


def test_a_connection_cut_mid_upload_is_retried(standin, tmp_path):
    from huggingface_hub import HfApi

    release = _release(tmp_path / "release", _weights(3))
    standin.drop_next("/commit/", times=2)  # huggingface_hub does not retry commits itself
    standin.drop_next("PUT", times=1)  # it retries large-file PUTs itself
    publish_to_hub(release, "me/flaky", True, TOKEN, "despite cuts")
    api = HfApi(endpoint=standin.endpoint, token=TOKEN)
    assert "model.safetensors" in api.list_repo_files("me/flaky")


def test_a_persistent_outage_gives_up_with_a_clear_error(standin, tmp_path):
    release = _release(tmp_path / "release", _weights(4))
    standin.drop_next("/commit/", times=10)
    with pytest.raises(PublishError, match="failed after 4 attempts") as e:
        publish_to_hub(release, "me/down", True, TOKEN, "never")
    assert TOKEN not in str(e.value)


def test_a_bad_token_and_a_read_only_token_say_what_is_missing(tmp_path):
    release = _release(tmp_path / "release", _weights(5))
    bad = "test-wrong-token-for-the-standin"
    with pytest.raises(PublishError, match=r"HTTP 401.*invalid or expired") as e:
        publish_to_hub(release, "me/denied", True, bad, "x")
    assert bad not in str(e.value)
    with pytest.raises(PublishError, match=r"HTTP 403.*lacks write access to 'me'") as e:
        publish_to_hub(release, "me/denied", True, READ_ONLY, "x")
    assert READ_ONLY not in str(e.value)


def test_the_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub_access.resolve_token() == TOKEN
    monkeypatch.delenv("HF_TOKEN")
    os.environ.pop("HF_TOKEN", None)
