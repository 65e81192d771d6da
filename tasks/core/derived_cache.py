"""Numbers derived once and kept in the cache folder: from a model's config alone, or measured
on this machine (the batch-split probe).

Planning measures an architecture by instantiating it on the meta device (no weights), which
imports transformers' modeling code: about 3.5 s of a 12 s dry run, paid again by every
command-line plan, MCP plan and served flow run, for numbers that depend only on the config
and the installed transformers. They are kept per hash of those, so another config or another
transformers version is measured afresh. A measurement of the machine is also taken one at a
time (two would share its cores). Nothing here is a library's job: no cache of this kind exists
in transformers or Prefect (Prefect's task cache needs a flow run)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tasks.core.atomic import write_text
from tasks.core.locks import waited

VERSION = 3  # bump when what is derived changes (3: a tower's matmuls, widths and modules)


def config_key(config: Any) -> str:
    """The config as JSON, every field written out (two configs that differ anywhere differ here)."""
    return config.to_json_string(use_diff=False)


def derived(
    kind: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]], alone_within_s: float | None = None
) -> dict[str, Any]:
    """`compute()` for this key, read from the cache folder when it was computed before. With
    `alone_within_s`, no two processes on this machine compute this kind at once (a measurement
    that another one would disturb): the second waits up to that long, then reads what the first
    found for the same key, or computes its own; past the wait, TimeoutError."""
    from training.tiny_model import cache_root

    text = json.dumps({"kind": kind, "v": VERSION, "transformers": version("transformers"), **key}, sort_keys=True)
    path = cache_root() / "derived" / kind / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    found = _read(path)
    if found is not None:
        return found
    with nullcontext() if alone_within_s is None else waited(path.parent / ".computing.lock", alone_within_s):
        found = _read(path)  # another process may have computed it while this one waited
        if found is None:
            found = compute()
            write_text(path, json.dumps(found))  # atomic: a concurrent reader sees the whole file or none
    return found


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
