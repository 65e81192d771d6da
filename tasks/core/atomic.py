"""Outputs are written under a temporary name and moved into place, so a reader (a later
stage, another process, a re-run after a crash) sees the old file or the new one, never a
half-written one. Renames within one folder are atomic on POSIX file systems."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a sibling temporary file, flushed to disk first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def replace_path(src: Path, dst: Path) -> None:
    """Move a finished file or folder `src` to `dst`, replacing what is there.

    A folder cannot be swapped in one rename, so the old one is first renamed aside (a
    crash between the two renames leaves it under `<dst>.replaced`, not lost) and removed
    only once the new one is in place.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and dst.exists():
        aside = dst.with_name(dst.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        dst.rename(aside)
        src.rename(dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        src.replace(dst)
