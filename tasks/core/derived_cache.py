"""Numbers derived from a model's config alone, kept in the cache folder.

Planning measures an architecture by instantiating it on the meta device (no weights), which
imports transformers' modeling code: about 3.5 s of a 12 s dry run, paid again by every
command-line plan, MCP plan and served flow run, for numbers that depend only on the config
and the installed transformers. They are kept per hash of those, so another config or another
transformers version is measured afresh. Nothing here is a library's job: no cache of this
kind exists in transformers or Prefect (Prefect's task cache needs a flow run)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from tasks.core.atomic import write_text

VERSION = 3  # bump when what is derived changes (3: a tower's matmuls, widths and modules)


def config_key(config: Any) -> str:
    """The config as JSON, every field written out (two configs that differ anywhere differ here)."""
    return config.to_json_string(use_diff=False)


def derived(kind: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()` for this key, read from the cache folder when it was computed before."""
    from training.tiny_model import cache_root

    text = json.dumps({"kind": kind, "v": VERSION, "transformers": version("transformers"), **key}, sort_keys=True)
    path = cache_root() / "derived" / kind / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    found = compute()
    write_text(path, json.dumps(found))  # atomic: a concurrent reader sees the whole file or none
    return found
