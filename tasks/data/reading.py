"""Reading a dataset in chunks of DataFrames whose index is the row number a user can find.

JSONL is parsed line by line (not through ``datasets``) so a broken line is reported by its
line number; the index is the line number for JSONL and the 1-based record number for JSON,
CSV and Parquet. Hub ids and folders go through ``datasets`` (Hub ids streamed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pandas as pd

from tasks.core.errors import UserFacingError

LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DatasetLoadError(UserFacingError, ValueError):
    """The dataset could not be read at all; the message says where and why."""


CHUNK_ROWS = 20_000  # rows per chunk of a columnar source (Parquet, CSV, datasets)
CHUNK_BYTES = 4 << 20  # bytes per block of JSONL: ~10k short chat rows, ~120 MB at the peak of checking


class UnreadableLines:
    """Lines of a JSONL file that are not JSON objects, collected while the file streams so
    that every one is reported at the end (with its line number), not only the first."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.shown = path, 0, []

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.shown) < 20:
            self.shown.append(text)

    def merge(self, other: UnreadableLines) -> None:
        """Fold in a later block's lines (blocks are merged in file order)."""
        self.shown += other.shown[: 20 - len(self.shown)]
        self.count += other.count

    def error(self) -> DatasetLoadError:
        more = f"\n  ... and {self.count - 20} more" if self.count > 20 else ""
        shown = "\n  - ".join(self.shown)
        return DatasetLoadError(f"{self.path}: {self.count} unreadable line(s):\n  - {shown}{more}")

    def raise_if_any(self) -> None:
        if self.count:
            raise self.error()


class LineBlock(NamedTuple):
    """Whole JSONL lines as read from the file, starting at line `first`: split and parsed where
    they are checked (in a worker process, for large files), so that work runs on every core
    and the reading process only moves bytes."""

    first: int
    data: bytes


def parse_block(block: LineBlock, unreadable: UnreadableLines, raw: list[bytes] | None = None) -> pd.DataFrame:
    """orjson per line (several times quicker than json here); a bad line is noted in
    `unreadable`, not fatal, so one pass reports them all. `raw`, when given, receives each
    parsed row's line as it is in the file."""
    records: list[dict] = []
    index: list[int] = []
    for lineno, line in enumerate(block.data.split(b"\n"), start=block.first):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if line.strip():
                unreadable.add(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(value, dict):
            unreadable.add(f"line {lineno}: expected a JSON object, got {type(value).__name__}")
            continue
        records.append(value)
        index.append(lineno)
        if raw is not None:
            raw.append(line)
    return pd.DataFrame.from_records(records, index=pd.Index(index, name="row"))


def _jsonl_blocks(path: Path, block_bytes: int) -> Iterator[LineBlock]:
    """Blocks of about `block_bytes` of whole lines: memory bounded by bytes, however long the rows."""
    first, rest = 1, b""
    with path.open("rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":  # a byte-order mark, as some Windows tools write, is not JSON
            f.seek(0)
        while data := f.read(block_bytes):
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:  # one line longer than a block: read on
                rest = data
                continue
            rest = data[cut + 1 :]
            yield LineBlock(first, data[:cut])
            first += data.count(b"\n", 0, cut) + 1
    if rest.strip():
        yield LineBlock(first, rest)


def _numbered(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Index each chunk by record number from 1, counting across chunks."""
    at = 1
    for df in frames:
        df.index = pd.Index(range(at, at + len(df)), name="row")
        at += len(df)
        yield df


def _load_refusal(source: str, split: str, local: bool, e: Exception) -> DatasetLoadError:
    from tasks.core.faults import hub_read_failure

    where = "local folder" if local else "Hub dataset"
    why = hub_read_failure(e, "dataset", "HF_DATASETS_OFFLINE", "set HF_TOKEN to a token with access")
    return DatasetLoadError(
        f"could not load {where} '{source}' (split '{split}'): {why}. "
        "If you are offline, point 'dataset' at a local .jsonl/.json/.csv/.parquet file."
    )


def iter_chunks(source: str, split: str = "train", rows: int | None = None) -> Iterator[pd.DataFrame]:
    """`iter_blocks`, JSONL lines parsed here; every unreadable line is reported at the end."""
    unreadable = UnreadableLines(Path(source))
    for block in iter_blocks(source, split, rows):
        yield parse_block(block, unreadable) if isinstance(block, LineBlock) else block
    unreadable.raise_if_any()


def iter_blocks(source: str, split: str = "train", rows: int | None = None) -> Iterator[LineBlock | pd.DataFrame]:
    """The dataset in blocks of at most `rows` rows (DataFrames, or JSONL lines), indexed by the row number a user can
    find (the line number for JSONL, the record number from 1 otherwise), so a file larger than
    memory is checked a chunk at a time. JSONL, CSV, Parquet, dataset folders (memory-mapped
    Arrow) and Hub datasets (streamed) are read chunk by chunk; a JSON array is one document
    and is parsed whole (convert it to JSONL when it is larger than memory)."""
    rows = rows or CHUNK_ROWS
    path = Path(source).expanduser()
    if path.is_file():
        yield from _file_chunks(path, split, rows)
        return
    looks_local = path.is_absolute() or source.startswith(".") or path.suffix.lower() in LOCAL_SUFFIXES
    if path.is_dir() or (not looks_local and HUB_ID.match(source)):
        yield from _numbered(_datasets_chunks(source, split, rows, local=path.is_dir()))
        return
    raise DatasetLoadError(f"dataset '{source}' was not found: no such file, and not a Hub id of the form 'owner/name'")


def _file_chunks(path: Path, split: str, rows: int) -> Iterator[LineBlock | pd.DataFrame]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DatasetLoadError(
            f"{path}: unsupported file type '{suffix}'; use one of {', '.join(sorted(LOCAL_SUFFIXES))}"
        )
    try:
        if suffix == ".jsonl":
            yield from _jsonl_blocks(path, CHUNK_BYTES)
        elif suffix == ".json":
            data = orjson.loads(path.read_bytes())
            if isinstance(data, dict) and split in data:
                data = data[split]
            if not isinstance(data, list):
                raise DatasetLoadError(f"{path}: expected a JSON list of records (or JSONL)")
            yield from _numbered(pd.DataFrame.from_records(data[i : i + rows]) for i in range(0, len(data), rows))
        elif suffix == ".csv":
            yield from _numbered(iter(pd.read_csv(path, keep_default_na=False, na_values=[], chunksize=rows)))
        else:
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
            yield from _numbered(b.to_pandas() for b in batches)
    except DatasetLoadError:
        raise
    except (ValueError, OSError) as e:  # orjson.JSONDecodeError is a ValueError
        raise DatasetLoadError(f"{path}: could not be read as {suffix[1:]}: {e}") from None


def _datasets_chunks(source: str, split: str, rows: int, local: bool) -> Iterator[pd.DataFrame]:
    """Through `datasets`: a folder is memory-mapped Arrow; a Hub dataset is streamed (nothing
    downloaded whole), with the Hub read retried like every other Hub read."""
    from datasets import load_dataset

    from tasks.core.faults import read_with_retries

    try:
        ds = read_with_retries(
            lambda: load_dataset(source, split=split, streaming=not local),
            f"dataset {source}",
            local=local,
        )
        for batch in _undecoded(ds).iter(batch_size=rows):
            yield pd.DataFrame(batch)
    except DatasetLoadError:
        raise
    except Exception as e:  # datasets raises many types; the kind and message matter
        raise _load_refusal(source, split, local, e) from None


def _undecoded(ds: Any) -> Any:
    """Image columns as {bytes, path} rather than decoded pictures: validation decodes each image
    once, where a bad one can be named by its row (an image folder gives paths, the Hub bytes)."""
    from datasets import Image, List, Sequence

    for name, feature in (ds.features or {}).items():
        if isinstance(feature, Image):
            ds = ds.cast_column(name, Image(decode=False))
        elif isinstance(feature, List | Sequence) and isinstance(feature.feature, Image):
            ds = ds.cast_column(name, List(Image(decode=False)))
    return ds


def dataset_folder(source: str) -> Path:
    """Where a dataset's relative image paths resolve: the file's folder, or the dataset folder."""
    path = Path(source).expanduser()
    return path.resolve() if path.is_dir() else path.resolve().parent if path.is_file() else Path.cwd()


def load_frame(source: str, split: str = "train") -> pd.DataFrame:
    """The whole dataset in one DataFrame, for small datasets; validation streams `iter_blocks`."""
    frames = list(iter_chunks(source, split))
    if not frames:
        return pd.DataFrame(index=pd.Index([], name="row"))
    return pd.concat(frames) if len(frames) > 1 else frames[0]
