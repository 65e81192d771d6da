"""Validate the dataset against the method's schema before anything is spent.

The data streams through in blocks (`reading.iter_blocks`), so a file larger than memory is
checked with bounded memory: pandera checks each chunk lazily (`tasks.data.schemas`), the failures
of every chunk are gathered into one error that names each rule's first rows with the value
found, and the good rows are written to the prepared JSONL the job trains on as they pass.
Duplicates are counted by 64-bit hashes, and token statistics are measured with the model's
tokenizer on a seeded uniform sample (`tasks.data.token_stats`).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import statistics
import sys
import time
import types
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pandera.pandas as pa

from tasks.core.errors import UserFacingError
from tasks.core.methods import METHODS, MethodDefinition, config_fields
from tasks.core.models import DatasetReport, TokenStats
from tasks.data.formats import SAMPLE_ROWS, Conversion, ConversionError, conversion_for, convert_chunk, recognise
from tasks.data.images import STAGED, ImageSource, check_block_images
from tasks.data.reading import LineBlock, UnreadableLines, dataset_folder, iter_blocks, parse_block
from tasks.data.schemas import (
    ANOMALIES,
    CODE_COLUMNS,
    EMPTY_OTHER_SHIFT,
    ROLES,
    plain,
    schema_for,
    turn_code,
    with_turn_codes,
)
from tasks.data.token_stats import CharEstimateTokenizer, Reservoir, histogram, prompt_lengths, token_lengths
from tasks.data.vision import ImageTally, ModelInputs

MAX_ROWS_SHOWN = 10
PROMPTED = ("preference", "implicit_preference", "vision_preference", "unpaired")  # a prompt can fill max_length
IMAGED = {"vision": "messages", "vision_preference": "prompt"}  # formats with images: where their placeholders are
MAX_TOKENIZED_ROWS = 10_000  # a seeded uniform sample: the mean to well under 1%, and ~8 s of the tiny tokenizer
HELDOUT_MAX = 64
WORKERS_FROM_BLOCKS = 4  # blocks a dataset has before workers check them
ROWS_NOTE = "rows are numbered from 1; for JSONL, the line number"


class DatasetValidationError(UserFacingError, ValueError):
    """The data would waste a run; the message lists each problem with its rows and columns."""


def sample_records(df: pd.DataFrame) -> list[dict]:
    """The first rows as plain records: what format recognition judges."""
    return df.head(SAMPLE_ROWS).map(plain).to_dict(orient="records")


# --- format detection and column mapping ----------------------------------------------


def apply_mapping(
    df: pd.DataFrame, mapping: dict[str, str], method: MethodDefinition, conversion: Conversion | None = None
) -> pd.DataFrame:
    canonical = {c for cols in method.formats.values() for c in cols}
    if conversion is not None:
        canonical |= {*conversion.reads, *conversion.optional}
    if method.keep_extra_columns:  # the columns reward functions read
        canonical |= {"answer", "tests"}
    for target, source in mapping.items():
        if target not in canonical:
            raise DatasetValidationError(
                f"columns: '{target}' is not a {method.name} column; map onto one of {', '.join(sorted(canonical))}"
            )
        if source not in df.columns:
            raise DatasetValidationError(
                f"columns: '{target}: {source}' names a column the dataset lacks; "
                f"its columns are {', '.join(map(str, df.columns))}"
            )
    return df.rename(columns={source: target for target, source in mapping.items()})


def detect_format(df: pd.DataFrame, method: MethodDefinition) -> str:
    """The method's format the rows are in. Columns with the right names are not enough: rows
    that recognition says need a conversion (HH-RLHF text in `chosen`/`rejected`, say) get the
    same answer `flows.inspect` gives, not a row-by-row refusal of a format they are not in."""
    verdict = recognise(sample_records(df), method.name)
    convertible = verdict.verdict == "NEEDS MAPPING" and any(c.conversion for c in verdict.candidates)
    for fmt, needed in method.formats.items():
        if all(c in df.columns for c in needed) and not convertible:
            return fmt
    wanted = " | ".join("+".join(cols) for cols in method.formats.values())
    raise DatasetValidationError(
        f"the dataset is not in a {method.name} format yet (columns [{', '.join(map(str, df.columns))}]; "
        f"{method.name} trains on {wanted}).\n{verdict.text()}"
        + ("\n`python -m flows.inspect DATASET` shows every method's verdict." if verdict.verdict != "READY" else "")
    )


def _shorten(value: Any, limit: int = 160) -> str:
    text = orjson.dumps(value, default=str).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Failures:
    """Every rule a row broke, gathered across chunks: per rule its first rows, the first
    value found and how many rows in all; the count of distinct bad rows."""

    def __init__(self) -> None:
        self.rules: dict[tuple[str, str], dict[str, Any]] = {}
        self.bad_rows = 0
        self.missing_columns: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.bad_rows or self.missing_columns)

    def merge(self, other: Failures) -> None:
        """Fold in a later chunk's failures (chunks are merged in file order)."""
        for (where, rule), e in other.rules.items():
            first = (where, rule) not in self.rules
            self.add(where, rule, e["rows"], e["value"] if first else "")
            self.rules[(where, rule)]["count"] += e["count"] - len(e["rows"])
        self.bad_rows += other.bad_rows
        self.missing_columns += [c for c in other.missing_columns if c not in self.missing_columns]

    def add(self, where: str, rule: str, rows: list[int], value: str = "") -> None:
        entry = self.rules.setdefault((where, rule), {"rows": [], "count": 0, "value": value})
        entry["rows"].extend(rows[: MAX_ROWS_SHOWN - len(entry["rows"])])
        entry["count"] += len(rows)

    def add_schema_errors(self, err: pa.errors.SchemaErrors, frame: pd.DataFrame, columns: list[str]) -> set[int]:
        """Record a chunk's pandera failure cases; returns the bad row numbers."""
        cases = err.failure_cases
        # A check across columns is reported once per column by pandera; report it once per row.
        row_wide = cases["schema_context"] == "DataFrameSchema"
        judged = cases["column"].astype(str).replace(CODE_COLUMNS)  # a code column speaks for its column
        where = np.where(row_wide, "columns " + "+".join(columns), "column '" + judged + "'")
        cases = cases.assign(place=where)
        for (place, check), group in cases.groupby(["place", "check"], sort=False, dropna=False):
            if check == "column_in_dataframe":
                name = str(group["failure_case"].iloc[0])
                if name not in self.missing_columns:
                    self.missing_columns.append(name)
                continue
            rows = sorted({int(i) for i in group["index"].dropna()})
            reason = "must not be missing (null)" if check == "not_nullable" else str(check)
            first = (place, reason) not in self.rules
            self.add(str(place), reason, rows, _offending(group, frame, str(check)) if first else "")
        bad = {int(i) for i in cases["index"].dropna()}
        self.bad_rows += len(bad)
        return bad

    def message(self, source: str, fmt: str) -> str:
        lines = [f"column '{c}' is missing" for c in self.missing_columns]
        found = []
        for (where, rule), e in self.rules.items():
            shown = ", ".join(map(str, e["rows"]))
            more = f" and {e['count'] - len(e['rows'])} more" if e["count"] > len(e["rows"]) else ""
            found.append((e["rows"][0] if e["rows"] else 0, f"{where}, rows {shown}{more}: {rule}{e['value']}"))
        lines += [text for _, text in sorted(found)]  # in file order, so the first bad row comes first
        return f"{source}: {self.bad_rows} bad row(s) for format '{fmt}' ({ROWS_NOTE}):\n  - " + "\n  - ".join(lines)


def _offending(group: pd.DataFrame, frame: pd.DataFrame, check: str) -> str:
    """The first bad row's value, shortened, and for a role rule the role found."""
    known = group.dropna(subset=["index"])
    if known.empty:
        return ""
    first = known.sort_values("index").iloc[0]
    row, value = int(first["index"]), first["failure_case"]
    if "role" in check and isinstance(value, list) and str(first.get("column")) not in CODE_COLUMNS:
        roles = [t.get("role") for t in value if isinstance(t, dict)]
        odd = [r for r in roles if r not in ROLES]
        if odd:
            return f" (row {row} has role {odd[0]!r}; roles in order: {roles[:8]})"
    if str(first.get("schema_context")) == "DataFrameSchema" and row in frame.index:
        value = frame.loc[row].to_dict()
    elif str(first.get("column")) in CODE_COLUMNS and row in frame.index:  # the value, not its code
        value = frame.at[row, CODE_COLUMNS[str(first["column"])]]
        judged = CODE_COLUMNS[str(first["column"])]
        return _offending(group.assign(failure_case=[value] * len(group), column=judged), frame, check)
    return f" (row {row}: {_shorten(value)})"


@dataclass(frozen=True)
class HeldOut:
    """Rows kept out of training to evaluate the trained model and its exports: a fraction
    (below 1) or a count, at most `maximum`, chosen at random with `seed`; none under 40 rows
    unless a count is given."""

    share: float = 0.05
    maximum: int = HELDOUT_MAX
    seed: int = 0

    def count(self, rows: int) -> int:
        if self.share >= 1:
            return min(int(self.share), rows // 2)
        return 0 if rows < 40 else min(self.maximum, int(rows * self.share))


def heldout_count(rows: int) -> int:
    return HeldOut().count(rows)


class SplitWriter:
    """Writes the prepared rows as they pass into one file; at the end, a seeded random choice of
    them (how many depends on the row count, known only then) goes to heldout.jsonl and the rest,
    in their order, to train.jsonl. Both files appear (atomically) only when the whole dataset
    passed; a failed check leaves nothing half-written."""

    def __init__(self, out_dir: Path, held_out: HeldOut | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.train, self.heldout = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
        self.images, self.staging = out_dir / STAGED, out_dir / f"{STAGED}.partial"  # vision rows' images
        shutil.rmtree(self.staging, ignore_errors=True)
        self.held_out = held_out or HeldOut()
        self._tmp = out_dir / "rows.jsonl.tmp"
        self._f = self._tmp.open("wb")
        self.rows = 0

    def write(self, lines: list[bytes]) -> None:
        self.rows += len(lines)
        if lines:
            self._f.write(b"\n".join(lines) + b"\n")

    def finish(self) -> int:
        """Split and close both files; returns the rows held out."""
        import random

        self._f.close()
        held = self.held_out.count(self.rows)
        chosen = set(random.Random(self.held_out.seed).sample(range(self.rows), held))
        train_tmp, held_tmp = self.train.with_suffix(".jsonl.tmp"), self.heldout.with_suffix(".jsonl.tmp")
        with self._tmp.open("rb") as rows, train_tmp.open("wb") as train, held_tmp.open("wb") as heldout:
            for i, line in enumerate(rows):
                (heldout if i in chosen else train).write(line)
        held_tmp.replace(self.heldout)
        train_tmp.replace(self.train)
        self._tmp.unlink()
        shutil.rmtree(self.images, ignore_errors=True)
        if self.staging.exists():
            self.staging.rename(self.images)
        return held

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)


def _empty_turns(row: dict) -> int:
    turns = [
        t
        for col in ("messages", "prompt", "completion", "chosen", "rejected")
        if isinstance(row.get(col), list)
        for t in row[col]
    ]
    return sum(1 for t in turns if not str(t.get("content") or "").strip())


def _role_anomalies(row: dict, counts: dict[str, int]) -> None:
    """Legal but worth a look: what a person reading the report should know about the turns."""
    for col in ("messages", "completion", "chosen", "rejected"):
        turns = row.get(col)
        if isinstance(turns, list) and turns:
            code = turn_code(turns)
            for bit, what in ANOMALIES.items():
                if code & bit:
                    counts[f"{col} {what}"] = counts.get(f"{col} {what}", 0) + 1


def _needs_plain(df: pd.DataFrame) -> bool:
    """Parquet and `datasets` give numpy arrays for list cells; JSONL gives lists already."""
    if df.empty:
        return False
    first = df.iloc[0].tolist()
    return any(isinstance(v, np.ndarray) or (isinstance(v, list | dict) and plain(v) != v) for v in first)


@dataclass(frozen=True)
class BlockJob:
    """What checking one block needs, fixed by the first block; picklable for worker processes."""

    source: str
    method: MethodDefinition
    mapping: dict[str, str]
    conversion: str | None
    fmt: str
    needed: list[str]
    kept: list[str]
    images: ImageSource | None = None  # vision rows: where their images resolve and are staged


@dataclass
class BlockResult:
    """One block checked: its good rows as prepared JSONL lines, and what was found."""

    lines: list[bytes] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    failures: Failures = field(default_factory=Failures)
    conversion_bad: list[str] = field(default_factory=list)
    conversion_bad_count: int = 0
    unreadable: UnreadableLines = field(default_factory=lambda: UnreadableLines(Path()))
    empty_turns: int = 0
    anomalies: dict[str, int] = field(default_factory=dict)
    hashes: bytes = b""
    labels: dict[bool, int] = field(default_factory=dict)  # unpaired rows: how many desirable, how many not
    image_sizes: list[list[tuple[int, int]]] = field(default_factory=list)  # vision rows: per line, its images


def _frame(block: LineBlock | pd.DataFrame, result: BlockResult, raw: list[bytes] | None = None) -> pd.DataFrame:
    """The block as a DataFrame of plain values; unreadable JSONL lines go to `result`."""
    if not isinstance(block, LineBlock):
        return block.map(plain) if _needs_plain(block) else block
    return parse_block(block, result.unreadable, raw)


def _prepare(df: pd.DataFrame, job: BlockJob, result: BlockResult) -> pd.DataFrame:
    """Mapping and conversion: the rows in the method's canonical columns."""
    convert = conversion_for(job.conversion, job.method.name) if job.conversion else None
    df = apply_mapping(df, job.mapping, job.method, convert)
    if convert is None:
        return df
    rows, numbers, bad = convert_chunk(
        df.to_dict(orient="records"), list(df.index), convert, job.source, job.method.name
    )
    result.conversion_bad, result.conversion_bad_count = bad[:MAX_ROWS_SHOWN], len(bad)
    return pd.DataFrame.from_records(rows, index=pd.Index(numbers, name="row"))


def check_block(block: LineBlock | pd.DataFrame, job: BlockJob) -> BlockResult:
    """Parse, map, convert and schema-check one block; the good rows come back as the JSONL
    lines the job will train on. Runs in a worker process for large datasets."""
    result = BlockResult()
    raw: list[bytes] = []
    df = _frame(block, result, raw)
    if df.empty:
        return result
    # Rows that need no change are written as they are in the file: serialising them again
    # costs a fifth of the check. (Duplicates are then found by their text as written.)
    as_written = bool(raw) and not job.mapping and not job.conversion and set(df.columns) == set(job.kept)
    as_written = as_written and job.images is None  # vision rows name their staged images instead
    line_of = dict(zip(df.index, raw, strict=True)) if as_written else {}
    df = _prepare(df, job, result).reindex(columns=job.kept)
    checked = with_turn_codes(df, parts=job.fmt == "vision") if job.fmt in ("messages", "vision") else df
    try:
        schema_for(job.fmt).validate(checked, lazy=True)
    except pa.errors.SchemaErrors as e:
        bad = result.failures.add_schema_errors(e, checked, job.needed)
        keep = ~checked.index.isin(list(bad))
        df, checked = df[keep], checked[keep]
    if job.images is not None:
        df, result.image_sizes, bad_images = check_block_images(df, job.images, result.failures.add, IMAGED[job.fmt])
        result.failures.bad_rows += bad_images
        checked = checked.loc[df.index]
    if job.fmt in ("messages", "vision"):
        codes = checked["_turns"].to_numpy()
        result.empty_turns = int((codes >> EMPTY_OTHER_SHIFT).sum())
        for bit, what in ANOMALIES.items():
            if n := int(((codes & bit) != 0).sum()):
                result.anomalies[f"messages {what}"] = n
    if job.fmt == "unpaired":
        result.labels = {bool(k): int(n) for k, n in df["label"].value_counts().items()}
    columns = [df[c].tolist() for c in job.kept]
    option = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
    for number, *values in zip(df.index, *columns, strict=True):
        record = dict(zip(job.kept, values, strict=True))
        line = line_of.get(number)
        result.lines.append(line.rstrip() if line is not None else orjson.dumps(record, option=option, default=str))
        if job.fmt not in ("messages", "vision"):
            result.empty_turns += _empty_turns(record)
            _role_anomalies(record, result.anomalies)
    result.numbers = [int(i) for i in df.index]
    # 64-bit content hashes, computed here (in parallel) and stable across processes, unlike hash()
    result.hashes = b"".join(blake2b(line, digest_size=8).digest() for line in result.lines)
    return result


class _Pass:
    """What one pass over the data gathers, merged block by block in file order."""

    def __init__(
        self, out_dir: Path, source: str, held_out: HeldOut | None = None, images: ImageTally | None = None
    ) -> None:
        self.failures = Failures()
        self.conversion_bad: list[str] = []
        self.conversion_bad_count = 0
        self.unreadable = UnreadableLines(Path(source))
        self.too_long: list[int] = []
        self.hashes = bytearray()  # 8 bytes a row, grown in place: the one cost that scales with rows
        self.empty_turns = 0
        self.anomalies: dict[str, int] = {}
        self.labels: dict[bool, int] = {}
        self.sample = Reservoir(MAX_TOKENIZED_ROWS, seed=0)  # (line, its tokens beyond the text: images)
        self.images = images
        self.notes: list[str] = []  # warnings decided outside the rows
        self.writer = SplitWriter(out_dir, held_out)
        self.check_seconds, self.check_processes = 0.0, 1

    def ok(self) -> bool:
        return not (self.failures or self.conversion_bad_count or self.too_long or self.unreadable.count)

    def merge(self, result: BlockResult, fmt: str, tokenizer: Any, max_length: int) -> None:
        self.failures.merge(result.failures)
        self.conversion_bad += result.conversion_bad[: MAX_ROWS_SHOWN - len(self.conversion_bad)]
        self.conversion_bad_count += result.conversion_bad_count
        self.unreadable.merge(result.unreadable)
        if fmt in PROMPTED and result.lines and not self.too_long:
            lengths = prompt_lengths(tokenizer, [orjson.loads(line) for line in result.lines])
            self.too_long += [r for r, n in zip(result.numbers, lengths, strict=True) if n >= max_length]
        if not self.ok():
            return  # the run is refused: the rest is only checked, not measured or written
        lines = result.lines
        self.hashes += result.hashes
        self.empty_turns += result.empty_turns
        for what, n in result.anomalies.items():
            self.anomalies[what] = self.anomalies.get(what, 0) + n
        for label, n in result.labels.items():
            self.labels[label] = self.labels.get(label, 0) + n
        extra = self.images.add(result.image_sizes, result.numbers) if self.images else [0] * len(lines)
        self.sample.offer(list(zip(lines, extra, strict=True)))
        self.writer.write(lines)


def _chat_template_refusal(source: str, method: MethodDefinition) -> DatasetValidationError:
    sft_fix = (
        "set training.chat_template_path (TRL's option) to a model that has one, e.g. "
        "Qwen/Qwen2.5-0.5B-Instruct, or to a .jinja file; "
        if "chat_template_path" in config_fields(method.config_class, method.trainer_module)
        else "use a model that has one (its -Instruct variant), or "
    )
    return DatasetValidationError(
        f"{source}: the rows are conversations (lists of turns), but the model's tokenizer has no chat "
        f"template to turn them into text. Fix: {sft_fix}give the data as plain text columns instead "
        f"({', '.join(next(iter(method.formats.values())))} as strings)"
    )


def _workers() -> int:
    """Processes that check blocks beside this one: every core, unless FINETUNE_VALIDATE_WORKERS
    says otherwise (0 checks in this process only)."""
    env = os.environ.get("FINETUNE_VALIDATE_WORKERS")
    return max(0, int(env)) if env else min(8, len(os.sched_getaffinity(0)))


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned worker processes, all started now. multiprocessing makes a spawned worker import
    the parent's __main__ first; here that is the flow's module (Prefect, torch: seconds and
    hundreds of MB per worker) or a user's script, for code they never run: `check_block` lives
    in this module. So __main__ is hidden from them while they start."""
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        started = [pool.submit(os.getpid) for _ in range(workers)]  # one process each, launched here
    finally:
        sys.modules["__main__"] = main
    for future in started:
        future.result()
    return pool


def _checked_blocks(
    blocks: Iterator[LineBlock | pd.DataFrame], job: BlockJob, pool: ProcessPoolExecutor | None, workers: int
) -> Iterator[BlockResult]:
    """Block results in file order; with a pool, at most two blocks per worker in flight, so
    memory stays bounded however large the file. A pool that breaks (a worker killed) leaves
    the rest to this process."""
    window: deque[tuple[LineBlock | pd.DataFrame, Future[BlockResult] | None]] = deque()

    def next_result() -> BlockResult:
        nonlocal pool
        block, future = window.popleft()
        if future is not None and pool is not None:
            try:
                return future.result()
            except BrokenProcessPool:
                logging.getLogger(__name__).warning("validation workers stopped; checking in this process")
                pool = None
        return check_block(block, job)

    for block in blocks:
        window.append((block, pool.submit(check_block, block, job) if pool is not None else None))
        while window and (pool is None or len(window) >= 2 * workers):
            yield next_result()
    while window:
        yield next_result()


def _head(block: LineBlock | pd.DataFrame, rows: int) -> LineBlock | pd.DataFrame:
    """The first rows of a block: enough to recognise the format without parsing it all."""
    if not isinstance(block, LineBlock):
        return block.head(rows)
    cut = -1
    for _ in range(rows):
        cut = block.data.find(b"\n", cut + 1)
        if cut < 0:
            return block
    return LineBlock(block.first, block.data[:cut])


def _probe(
    first_block: LineBlock | pd.DataFrame | None,
    source: str,
    method: MethodDefinition,
    tokenizer: Any,
    columns: dict[str, str] | None,
    conversion: str | None,
) -> tuple[BlockJob, list[str], dict[str, str]]:
    """What every block is checked against, fixed from the first rows before the full pass: the
    format and columns (with the user's extra columns), and the verdict per method. Refuses an
    empty dataset, and conversations the tokenizer has no chat template for."""
    probe = _frame(_head(first_block, SAMPLE_ROWS), BlockResult()) if first_block is not None else None
    if probe is None or probe.empty:
        raise DatasetValidationError(f"{source}: the dataset has no rows")
    given = sample_records(probe)
    verdicts = {m: recognise(given, m).text() for m in METHODS}
    job = BlockJob(source, method, dict(columns or {}), conversion, "", [], [])
    prepared = _prepare(probe, job, BlockResult())
    fmt = detect_format(prepared, method)
    needed = list(method.formats[fmt])
    extra = [str(c) for c in prepared.columns if c not in needed]
    job = BlockJob(
        source, method, job.mapping, conversion, fmt, needed, needed + (extra if method.keep_extra_columns else [])
    )
    if fmt != "text" and not getattr(tokenizer, "chat_template", None):
        if any(isinstance(v, list) for v in prepared[needed].head(1).map(plain).iloc[0].tolist()):
            raise _chat_template_refusal(source, method)
    return job, extra, verdicts


def validate_dataset(
    source: str,
    method: MethodDefinition,
    tokenizer: Any,
    max_length: int,
    out_dir: Path,
    split: str = "train",
    columns: dict[str, str] | None = None,
    conversion: str | None = None,
    held_out: HeldOut | None = None,
    inputs: ModelInputs | None = None,
) -> DatasetReport:
    """Check every row, measure the data, and write the canonical rows to ``out_dir/train.jsonl``
    (converted first when the spec names a conversion: the job trains on what was checked).
    Vision rows have their images checked and copied to ``out_dir/images``."""
    blocks = iter_blocks(source, split)
    first_block = next(blocks, None)
    job, extra, verdicts = _probe(first_block, source, method, tokenizer, columns, conversion)
    fmt, needed = job.fmt, job.needed
    state, job = _start(job, out_dir, held_out, inputs)
    ahead = list(itertools.islice(blocks, WORKERS_FROM_BLOCKS - 1))
    # starting workers costs about a second: worth it from a few blocks on (some 50k short rows)
    workers = _workers() if len(ahead) == WORKERS_FROM_BLOCKS - 1 else 0
    blocks = itertools.chain([first_block], ahead, blocks)
    started = time.perf_counter()
    pool = _start_pool(workers) if workers else None
    try:
        for result in _checked_blocks(blocks, job, pool, workers):
            state.merge(result, fmt, tokenizer, max_length)
        if not state.ok():
            raise _refusal(state, source, fmt, max_length)
        if fmt == "unpaired":
            _refuse_one_label(state.labels, source)
        held = state.writer.finish()
        state.check_seconds, state.check_processes = time.perf_counter() - started, max(1, workers)
        if inputs and inputs.vision and not (state.images and state.images.images):
            state.notes.append(inputs.text_only_warning())
        report = _report(
            state,
            source,
            split,
            fmt,
            needed,
            [] if method.keep_extra_columns else extra,
            columns,
            conversion,
            verdicts,
            tokenizer,
            max_length,
            held,
        )
    except BaseException:
        state.writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return report


def _start(
    job: BlockJob, out_dir: Path, held_out: HeldOut | None, inputs: ModelInputs | None
) -> tuple[_Pass, BlockJob]:
    """The pass's state, and the job with where its images go when the rows have images; image
    rows for a model that cannot see them are refused here, before any row is checked."""
    image_tokens = inputs.image_tokens if inputs else None
    if job.fmt not in IMAGED:
        return _Pass(out_dir, job.source, held_out), job
    if image_tokens is None:
        raise DatasetValidationError((inputs or ModelInputs("unknown", None)).refuse_images(job.source))
    state = _Pass(out_dir, job.source, held_out, ImageTally(image_tokens))
    return state, replace(job, images=ImageSource(dataset_folder(job.source), state.writer.staging))


def _refuse_one_label(labels: dict[bool, int], source: str) -> None:
    """KTO weighs desirable answers against undesirable ones: a set of only one kind has nothing
    to weigh (TRL would train on it, and learn only to raise or only to lower likelihoods)."""
    good, bad = labels.get(True, 0), labels.get(False, 0)
    if good and bad:
        return
    only = "true (desirable)" if good else "false (undesirable)"
    raise DatasetValidationError(
        f"{source}: every one of the {good + bad} rows has label {only}; KTO needs answers of both kinds. Add rows "
        "labelled "
        + ("false" if good else "true")
        + (", or train on these rows with SFT (drop `label`)" if good else "")
    )


def _refusal(state: _Pass, source: str, fmt: str, max_length: int) -> UserFacingError:
    parts = []
    if state.unreadable.count:
        if not (state.conversion_bad_count or state.failures or state.too_long):
            return state.unreadable.error()
        parts.append(str(state.unreadable.error()))
    if state.conversion_bad_count:
        shown = "\n  - ".join(state.conversion_bad)
        more = state.conversion_bad_count - len(state.conversion_bad)
        parts.append(
            f"{source}: {state.conversion_bad_count} row(s) cannot be read by the conversion:\n  - {shown}"
            + (f"\n  ... and {more} more" if more else "")
        )
    if state.failures:
        parts.append(state.failures.message(source, fmt))
    if state.too_long:
        shown = ", ".join(map(str, state.too_long[:MAX_ROWS_SHOWN]))
        more = f" and {len(state.too_long) - MAX_ROWS_SHOWN} more" if len(state.too_long) > MAX_ROWS_SHOWN else ""
        parts.append(
            f"{source}: rows {shown}{more}: the prompt alone fills max_length={max_length} tokens, so nothing of "
            "either answer would be trained; shorten the prompts or raise training.max_length"
        )
    text = "\n".join(parts)
    return ConversionError(text) if state.conversion_bad_count else DatasetValidationError(text)


def _report(
    state: _Pass,
    source: str,
    split: str,
    fmt: str,
    needed: list[str],
    dropped: list[str],
    columns: dict[str, str] | None,
    conversion: str | None,
    verdicts: dict[str, str],
    tokenizer: Any,
    max_length: int,
    held: int,
) -> DatasetReport:
    rows = state.writer.rows
    lengths = _sample_lengths(state.sample.items, tokenizer, fmt)
    scale = rows / len(lengths)  # 1 when every row was measured
    over = round(sum(1 for n in lengths if n > max_length) * scale)
    cut = round(sum(n - max_length for n in lengths if n > max_length) * scale)
    hashes = np.frombuffer(state.hashes, dtype=np.int64)  # a view: sorted in place, no copy
    hashes.sort()
    duplicates = int(np.count_nonzero(hashes[1:] == hashes[:-1]))
    warnings = _warnings(state, fmt, dropped, tokenizer, max_length, held, over, duplicates, len(lengths))
    return DatasetReport(
        source=source,
        split=split,
        format=fmt,  # type: ignore[arg-type]
        rows=rows,
        columns=needed,
        column_mapping=dict(columns or {}),
        conversion=conversion,
        verdicts=verdicts,
        tokens=TokenStats(
            min=lengths[0],
            max=lengths[-1],
            mean=round(statistics.fmean(lengths), 2),
            p50=lengths[len(lengths) // 2],
            p95=lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        ),
        total_tokens=int(round(statistics.fmean(lengths) * rows)),
        max_length=max_length,
        rows_over_max_length=over,
        tokens_truncated=cut,
        length_percentiles=[lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in range(101)],
        length_histogram=[(lo, hi, round(n * scale)) for lo, hi, n in histogram(lengths, max_length)],
        token_rows_measured=len(lengths),
        check_seconds=round(state.check_seconds, 2),
        check_processes=state.check_processes,
        duplicates=duplicates,
        empty_turns=state.empty_turns,
        role_anomalies=dict(state.anomalies),
        warnings=warnings,
        token_counts="estimated" if isinstance(tokenizer, CharEstimateTokenizer) else "measured",
        prepared_path=str(state.writer.train),
        train_rows=rows - held,
        heldout_rows=held,
        heldout_source=f"{held} training rows chosen at random (seed {state.writer.held_out.seed})" if held else "",
        heldout_path=str(state.writer.heldout),
        images=state.images.stats(str(state.writer.images)) if state.images else None,
    )


def _sample_lengths(items: list[tuple[bytes, int]], tokenizer: Any, fmt: str) -> list[int]:
    """The sampled rows' token lengths, sorted: their text, plus their images' tokens."""
    texts = token_lengths(tokenizer, fmt, [orjson.loads(line) for line, _ in items])
    return sorted(n + extra for n, (_, extra) in zip(texts, items, strict=True))


def _warnings(
    state: _Pass,
    fmt: str,
    dropped: list[str],
    tokenizer: Any,
    max_length: int,
    held: int,
    over: int,
    duplicates: int,
    measured: int,
) -> list[str]:
    """What the report warns about: estimates, dropped columns, truncation, duplicates, odd turns,
    a sampled measurement, held-out rows."""
    rows = state.writer.rows
    scale = rows / measured
    warnings = []
    if isinstance(tokenizer, CharEstimateTokenizer):
        warnings.append(tokenizer.describe())
    if dropped:
        warnings.append(f"columns not used by {fmt} and left out: {', '.join(dropped)}")
    if over:
        what = "have a side that exceeds" if fmt.endswith("preference") else "exceed"
        warnings.append(f"{over} row(s) {what} max_length={max_length} tokens and will be truncated")
    if duplicates:
        warnings.append(f"{duplicates} duplicate row(s)")
    if state.empty_turns:
        warnings.append(f"{state.empty_turns} empty system/tool turn(s)")
    warnings += [f"{n} row(s): {what}" for what, n in state.anomalies.items()]
    warnings += state.images.warnings() if state.images else []
    warnings += state.notes
    if scale > 1:
        warnings.append(
            f"token statistics measured on a seeded uniform sample of {measured} of {rows} rows "
            "(counts over max_length scaled to all rows)"
        )
    if held:
        seed = state.writer.held_out.seed
        warnings.append(
            f"{held} row(s), chosen at random (seed {seed}), are held out of training to evaluate the trained "
            "model against the base model and its GGUF files"
        )
    return warnings
