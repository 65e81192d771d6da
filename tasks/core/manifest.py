"""Sizes and hashes of the files a stage wrote, recorded with its result and checked before
a later stage (or a re-run) trusts them: a file cut short, edited or deleted since is found,
and the stage that made it runs again."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.core.models import FileRecord


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record(root: Path, folders: list[Path]) -> list[FileRecord]:
    """Every file under `folders`, by its path relative to `root`."""
    files = sorted(p for d in folders for p in d.rglob("*") if p.is_file())
    return [FileRecord(path=str(p.relative_to(root)), size=p.stat().st_size, sha256=sha256_file(p)) for p in files]


def problems(root: Path, records: list[FileRecord]) -> list[str]:
    """What no longer matches the record (empty when everything does)."""
    found = []
    for r in records:
        path = root / r.path
        if not path.is_file():
            found.append(f"{r.path} is missing")
        elif path.stat().st_size != r.size:
            found.append(f"{r.path} has {path.stat().st_size} bytes, {r.size} were recorded")
        elif sha256_file(path) != r.sha256:
            found.append(f"{r.path} changed since it was written (sha256 differs)")
    return found
