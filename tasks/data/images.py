"""The images of vision rows: found, opened, and staged beside the prepared rows.

A row's images may be paths (relative to the dataset file's folder, or absolute), or what the
`datasets` Image feature gives ({bytes, path}). Each is read once, decoded in full by Pillow (a
truncated file fails here, not in training), and written by content into the run's data folder,
so the job trains on the images that were checked, wherever it runs, and the prepared rows name
them by a path relative to that folder.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any

STAGED = "images"  # beside train.jsonl; the rows' paths are relative to that folder
NOT_FOUND = "image file not found"
UNREADABLE = "Pillow cannot open the image"
NOT_AN_IMAGE = "an image must be a file path or {bytes, path} (the datasets Image feature)"
PLACEHOLDERS = "the image parts in messages must match the images given, one {type: image} part per image"


@dataclass(frozen=True)
class ImageSource:
    """Where a block's image paths resolve, and where checked images are staged."""

    folder: Path
    staging: Path


@dataclass
class RowImages:
    """One row's images: their staged paths and sizes (width, height), or what is wrong."""

    paths: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (rule, the value and why)


def image_parts(messages: Any) -> int:
    """How many {type: image} parts a conversation has (its image placeholders)."""
    if not isinstance(messages, list):
        return 0
    return sum(
        1
        for turn in messages
        if isinstance(turn, dict) and isinstance(turn.get("content"), list)
        for part in turn["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def _read(value: Any, source: ImageSource) -> tuple[bytes, str]:
    """The image's bytes and how to name it in an error; raises LookupError or TypeError."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), str(value.get("path") or "bytes")
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise TypeError(value)
    if value.startswith(("http://", "https://")):
        raise LookupError(f"{value!r}: URLs are not fetched; download the images and give their paths")
    path = Path(value).expanduser()
    full = path if path.is_absolute() else source.folder / path
    try:
        return full.read_bytes(), value
    except OSError as e:
        raise LookupError(f"{value!r}, looked for at {full} ({e.strerror or e})") from None


def _stage(data: bytes, suffix: str, source: ImageSource) -> str:
    """Written once by content: a rerun or a repeated image costs nothing more."""
    name = f"{blake2b(data, digest_size=12).hexdigest()}.{suffix}"
    target = source.staging / name
    if not target.exists():
        source.staging.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return f"{STAGED}/{name}"


def check_row_images(messages: Any, images: Any, source: ImageSource) -> RowImages:
    """Every image of a row read, decoded and staged; placeholders counted against them."""
    from PIL import Image, UnidentifiedImageError

    found = RowImages()
    missing = images is None or (isinstance(images, float) and images != images)  # no key in the row: NaN
    given = [] if missing else [images] if isinstance(images, str | dict) else list(images)
    if len(given) != (parts := image_parts(messages)):
        found.problems.append((PLACEHOLDERS, f"{parts} image part(s), {len(given)} image(s)"))
    for value in given:
        try:
            data, name = _read(value, source)
        except LookupError as e:
            found.problems.append((NOT_FOUND, str(e)))
            continue
        except TypeError:
            found.problems.append((NOT_AN_IMAGE, repr(value)[:120]))
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                size, kind = image.size, (image.format or "png").lower()
        except UnidentifiedImageError:
            found.problems.append((UNREADABLE, f"{name!r}: not in an image format Pillow reads (PNG, JPEG, WebP, ...)"))
            continue
        except Exception as e:  # Pillow raises many types for bad data; the message is what helps
            found.problems.append((UNREADABLE, f"{name!r}: {type(e).__name__}: {e}"))
            continue
        found.paths.append(_stage(data, "jpg" if kind == "jpeg" else kind, source))
        found.sizes.append(size)
    return found


def check_block_images(
    df: Any, source: ImageSource, add: Any, column: str = "messages"
) -> tuple[Any, list[list[tuple[int, int]]], int]:
    """A block of vision rows with its images checked and staged: the good rows (their `images`
    now staged paths), each row's image sizes, and how many rows were bad. `column` holds the
    image placeholders (a pair's prompt). `add(where, rule, rows, value)` records a failure as
    the validation's `Failures.add` does."""
    keep, paths, sizes, bad = [], [], [], 0
    for number, messages, images in zip(df.index, df[column].tolist(), df["images"].tolist(), strict=True):
        found = check_row_images(messages, images, source)
        if found.problems:
            bad += 1
            for rule, value in found.problems:
                where = f"columns {column}+images" if rule == PLACEHOLDERS else "column 'images'"
                add(where, rule, [int(number)], f" (row {int(number)}: {value})")
            continue
        keep.append(number)
        paths.append(found.paths)
        sizes.append(found.sizes)
    good = df.loc[keep].copy()
    good["images"] = paths
    return good, sizes, bad
