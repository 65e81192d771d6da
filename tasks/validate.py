"""Stage 1: validate the dataset against the method's schema before anything is spent.

pandera does the checking (one schema per format, lazily, so every bad row is reported at
once); this module turns its failure cases into an error that names rows and columns, then
measures the data with the model's own tokenizer for the `DatasetReport`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from tasks.dataset_io import load_frame
from tasks.errors import UserFacingError
from tasks.formats import SAMPLE_ROWS, Conversion, conversion_for, convert_rows, recognise
from tasks.methods import MethodDefinition
from tasks.models import DatasetReport, TokenStats

ROLES = ("system", "user", "assistant", "tool")
MAX_ROWS_SHOWN = 10
MAX_TOKENIZED_ROWS = 20_000
HELDOUT_MAX = 16


class DatasetValidationError(UserFacingError, ValueError):
    """The data would waste a run; the message lists each problem with its rows and columns."""


def _plain(value: Any) -> Any:
    """Parquet and `datasets` hand back numpy arrays for list columns; make them lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def sample_records(df: pd.DataFrame) -> list[dict]:
    """The first rows as plain records: what format recognition judges."""
    return df.head(SAMPLE_ROWS).map(_plain).to_dict(orient="records")


# --- element checks: each returns True for a good value --------------------------------


def _is_turn_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(t, dict) and "role" in t and "content" in t for t in v)


def _roles_known(v: Any) -> bool:
    return not _is_turn_list(v) or all(t["role"] in ROLES for t in v)


def _turn_text_present(v: Any) -> bool:
    if not _is_turn_list(v):
        return True
    return all(
        isinstance(t["content"], str) and t["content"].strip() != "" for t in v if t["role"] in ("user", "assistant")
    )


def _role_order(v: Any) -> bool:
    if not _is_turn_list(v) or not _roles_known(v):
        return True
    roles = [t["role"] for t in v]
    if "system" in roles[1:]:
        return False
    convo = [r for r in roles if r in ("user", "assistant")]
    if not convo or convo[0] != "user" or "assistant" not in convo:
        return False
    return all(a != b for a, b in zip(convo, convo[1:], strict=False))


def _is_text_or_turns(v: Any) -> bool:
    return isinstance(v, str) or _is_turn_list(v)


def _not_empty(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip() != ""
    return not isinstance(v, list) or len(v) > 0


def _turn_checks() -> list[pa.Check]:
    return [
        pa.Check(_is_turn_list, element_wise=True, error="must be a non-empty list of turns, each {role, content}"),
        pa.Check(_roles_known, element_wise=True, error=f"every turn's role must be one of {', '.join(ROLES)}"),
        pa.Check(
            _turn_text_present, element_wise=True, error="every user and assistant turn needs non-empty text content"
        ),
        pa.Check(
            _role_order,
            element_wise=True,
            error="turns must go [system], user, assistant, user, ... (no repeats) with at least one assistant turn",
        ),
    ]


def _text_checks(what: str) -> list[pa.Check]:
    return [
        pa.Check(_is_text_or_turns, element_wise=True, error=f"{what} must be a string (or a list of turns)"),
        pa.Check(_not_empty, element_wise=True, error=f"{what} must not be empty"),
    ]


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False) if not isinstance(v, str) else v.strip()


def _sides_differ(df: pd.DataFrame) -> pd.Series:
    return df["chosen"].map(_canonical) != df["rejected"].map(_canonical)


def _same_kind(df: pd.DataFrame) -> pd.Series:
    kinds = [df[c].map(lambda v: isinstance(v, list)) for c in df.columns]
    return pd.concat(kinds, axis=1).nunique(axis=1) == 1


def _shared_prefix(chosen: Any, rejected: Any) -> int:
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    return n


def _implicit_prompt_ok(df: pd.DataFrame) -> pd.Series:
    """Both sides are conversations sharing at least one leading turn (the prompt), then each
    goes on with its own answer."""

    def ok(row: pd.Series) -> bool:
        c, r = row["chosen"], row["rejected"]
        if not (_is_turn_list(c) and _is_turn_list(r)):
            return False
        n = _shared_prefix(c, r)
        return 0 < n < min(len(c), len(r)) and c[-1]["role"] == r[-1]["role"] == "assistant"

    return df.apply(ok, axis=1)


def _conversation_order_ok(df: pd.DataFrame) -> pd.Series:
    """prompt + each side, when given as turns, follow the chat role order."""

    def ok(row: pd.Series) -> bool:
        prompt = row["prompt"] if "prompt" in row and isinstance(row["prompt"], list) else []
        for side in ("chosen", "rejected"):
            turns = row[side]
            if isinstance(turns, list) and _is_turn_list(turns) and not _role_order(prompt + turns):
                return False
        return True

    return df.apply(ok, axis=1)


def _preference_schema(fmt: str) -> pa.DataFrameSchema:
    sides = {
        side: pa.Column(
            None,
            nullable=False,
            checks=_text_checks(side)
            + [
                pa.Check(
                    _roles_known,
                    element_wise=True,
                    error=f"{side}: every turn's role must be one of {', '.join(ROLES)}",
                ),
                pa.Check(
                    _turn_text_present, element_wise=True, error=f"{side}: every user and assistant turn needs text"
                ),
            ],
        )
        for side in ("chosen", "rejected")
    }
    if fmt == "preference":
        sides = {"prompt": pa.Column(None, nullable=False, checks=_text_checks("prompt")), **sides}
    checks = [
        pa.Check(_sides_differ, error="chosen and rejected are identical: the pair teaches nothing"),
        pa.Check(_same_kind, error="prompt, chosen and rejected must all be text or all be lists of turns"),
        pa.Check(
            _conversation_order_ok, error="prompt + answer turns break the role order [system], user, assistant, ..."
        ),
    ]
    if fmt == "implicit_preference":
        checks.append(
            pa.Check(
                _implicit_prompt_ok,
                error="without a prompt column, chosen and rejected must be conversations that share their leading "
                "turns (the prompt) and each end with a different assistant turn",
            )
        )
    return pa.DataFrameSchema(sides, checks=checks, strict=False, coerce=False)


def schema_for(fmt: str) -> pa.DataFrameSchema:
    """The pandera schema of one SFT dataset format (canonical column names).

    No dtype is pinned: pandas may store text as object or string dtype, and a cell may hold
    text or a list of turns; the element checks decide what is acceptable."""
    if fmt == "messages":
        columns = {"messages": pa.Column(None, nullable=False, checks=_turn_checks())}
    elif fmt == "prompt_completion":
        columns = {
            "prompt": pa.Column(None, nullable=False, checks=_text_checks("prompt")),
            "completion": pa.Column(None, nullable=False, checks=_text_checks("completion")),
        }
    elif fmt in ("preference", "implicit_preference"):
        return _preference_schema(fmt)
    elif fmt == "prompt_only":
        columns = {
            "prompt": pa.Column(
                None,
                nullable=False,
                checks=[
                    *_text_checks("prompt"),
                    pa.Check(
                        _roles_known, element_wise=True, error=f"every turn's role must be one of {', '.join(ROLES)}"
                    ),
                    pa.Check(
                        lambda v: not isinstance(v, list) or not _is_turn_list(v) or v[-1]["role"] == "user",
                        element_wise=True,
                        error="a conversational prompt must end with a user turn (the model answers it)",
                    ),
                ],
            )
        }
    elif fmt == "text":
        columns = {
            "text": pa.Column(
                None,
                nullable=False,
                checks=[
                    pa.Check(lambda v: isinstance(v, str), element_wise=True, error="text must be a string"),
                    pa.Check(_not_empty, element_wise=True, error="text must not be empty"),
                ],
            )
        }
    else:
        raise ValueError(f"unknown format {fmt}")
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


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
    for fmt, needed in method.formats.items():
        if all(c in df.columns for c in needed):
            return fmt
    verdict = recognise(sample_records(df), method.name)
    wanted = " | ".join("+".join(cols) for cols in method.formats.values())
    raise DatasetValidationError(
        f"the dataset is not in a {method.name} format yet (columns [{', '.join(map(str, df.columns))}]; "
        f"{method.name} trains on {wanted}).\n{verdict.text()}"
        + ("\n`python -m flows.inspect DATASET` shows every method's verdict." if verdict.verdict != "READY" else "")
    )


def _offending(group: pd.DataFrame, frame: pd.DataFrame, check: str) -> str:
    """The first bad row's value, shortened, and for a role rule the role found."""
    first = group.dropna(subset=["index"]).iloc[0] if group["index"].notna().any() else None
    if first is None:
        return ""
    value = first["failure_case"]
    if "role" in str(check) and isinstance(value, list):
        roles = [t.get("role") for t in value if isinstance(t, dict)]
        odd = [r for r in roles if r not in ROLES]
        if odd:
            return f" (row {int(first['index'])} has role {odd[0]!r}; roles in order: {roles[:8]})"
    if str(first.get("schema_context")) == "DataFrameSchema" and int(first["index"]) in frame.index:
        value = frame.loc[int(first["index"])].to_dict()
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return f" (row {int(first['index'])}: {text if len(text) <= 160 else text[:157] + '...'})"


def _format_failures(
    err: pa.errors.SchemaErrors, source: str, fmt: str, columns: list[str], frame: pd.DataFrame | None = None
) -> str:
    cases = err.failure_cases.copy()
    # A check across columns is reported once per column by pandera; report it once per row.
    row_wide = cases["schema_context"] == "DataFrameSchema"
    cases.loc[row_wide, "column"] = "columns " + "+".join(columns)
    cases.loc[~row_wide, "column"] = "column '" + cases.loc[~row_wide, "column"].astype(str) + "'"
    found = []
    for (where, check), group in cases.groupby(["column", "check"], sort=False, dropna=False):
        rows = sorted({int(i) for i in group["index"].dropna()})
        if check == "column_in_dataframe":
            found.append((0, f"column '{group['failure_case'].iloc[0]}' is missing"))
            continue
        reason = "must not be missing (null)" if check == "not_nullable" else str(check)
        shown = ", ".join(map(str, rows[:MAX_ROWS_SHOWN]))
        more = f" and {len(rows) - MAX_ROWS_SHOWN} more" if len(rows) > MAX_ROWS_SHOWN else ""
        value = _offending(group, frame, check) if frame is not None else ""
        found.append((rows[0] if rows else 0, f"{where}, rows {shown}{more}: {reason}{value}"))
    lines = [text for _, text in sorted(found)]  # in file order, so the first bad row comes first
    return (
        f"{source}: {len(set(cases['index'].dropna()))} bad row(s) for format '{fmt}' "
        "(rows are numbered from 1; for JSONL, the line number):\n  - " + "\n  - ".join(lines)
    )


def histogram(lengths: list[int], max_length: int, bins: int = 10) -> list[tuple[int, int, int]]:
    """Rows per token-length bin (from, to]: equal bins over the lengths seen, split at max_length
    when it falls inside, so the rows that truncation cuts have bins of their own."""
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    width = max(1, -(-(top - low + 1) // bins))
    start = max(0, low - 1 - (low - 1) % width)
    edges = list(range(start, top + width, width))
    if edges[0] < max_length < edges[-1] and max_length not in edges:
        edges = sorted([*edges, max_length])
    return [(lo, hi, sum(1 for x in lengths if lo < x <= hi)) for lo, hi in zip(edges, edges[1:], strict=False)]


def heldout_count(rows: int) -> int:
    """Rows kept out of training to evaluate exports: 5%, at most HELDOUT_MAX, none under 40 rows."""
    return 0 if rows < 40 else min(HELDOUT_MAX, rows // 20)


def _write_jsonl(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


# --- measuring ------------------------------------------------------------------------


# Characters per token of each family's tokenizer on English chat text: a stated assumption
# used only when the model's tokenizer cannot encode (a config-only folder, a Hub model
# planned offline). Larger vocabularies pack more characters into a token.
CHARS_PER_TOKEN = {
    "llama": 4.0,  # Llama 3.x, 128k vocabulary
    "qwen2": 3.8,
    "qwen2_moe": 3.8,
    "qwen3": 3.8,
    "qwen3_moe": 3.8,
    "gemma": 4.2,
    "gemma2": 4.2,
    "gemma3": 4.2,
    "gemma3_text": 4.2,
    "mistral": 3.5,  # 32k vocabulary
    "mixtral": 3.5,
    "phi3": 3.5,
}
DEFAULT_CHARS_PER_TOKEN = 4.0
PROBE_TEXT = "Hello, world! The quick brown fox jumps over 13 lazy dogs."


class CharEstimateTokenizer:
    """Stands in when the model's tokenizer cannot encode: the family's characters per token,
    plus four tokens of chat markup per turn. `why` says what was wrong with the real one."""

    def __init__(self, model_type: str | None = None, why: str = "it could not be read") -> None:
        self.model_type = model_type
        self.chars_per_token = CHARS_PER_TOKEN.get(model_type or "", DEFAULT_CHARS_PER_TOKEN)
        self.why = why
        self.chat_template = "estimate"

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [0] * max(1, round(len(text) / self.chars_per_token))}

    def apply_chat_template(self, turns: list[dict], tokenize: bool = False) -> str:
        return "".join(f"<|{t.get('role')}|>{t.get('content') or ''}<|end|>" for t in turns)

    def describe(self) -> str:
        family = f"{self.model_type} family" if self.model_type in CHARS_PER_TOKEN else "no known family"
        return (
            f"token counts are ESTIMATED at {self.chars_per_token} characters per token ({family}), because the "
            f"model's tokenizer {self.why}; a real run needs the model's tokenizer files (tokenizer.json, "
            "tokenizer_config.json) next to its config.json"
        )


def tokenizer_problem(tokenizer: Any) -> str | None:
    """Why a loaded tokenizer cannot be trusted to count tokens, or None. transformers builds
    an empty tokenizer for a folder with only config.json: a vocabulary of 1 that encodes
    every text to no tokens."""
    try:
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        size = len(tokenizer)
    except Exception as e:
        return f"fails to encode text ({type(e).__name__}: {e})"
    if size < 100 or len(ids) == 0:
        return f"is empty (a vocabulary of {size}; a test sentence encodes to {len(ids)} tokens)"
    return None


def _needs_chat_template(records: list[dict]) -> bool:
    return bool(records) and any(isinstance(v, list) for v in records[0].values())


def _texts(tokenizer: Any, fmt: str, row: dict) -> list[str]:
    """The text(s) of a row as the trainer sees them; a preference row gives one per side."""

    def render(v: Any) -> str:
        return tokenizer.apply_chat_template(v, tokenize=False) if isinstance(v, list) else v

    if fmt in ("preference", "implicit_preference"):
        prompt = row.get("prompt", [] if isinstance(row["chosen"], list) else "")
        return [render(prompt + row[side]) for side in ("chosen", "rejected")]
    if fmt == "prompt_only":
        return [render(row["prompt"])]
    if fmt == "messages":
        return [render(row["messages"])]
    if fmt == "prompt_completion":
        return [render(row["prompt"]) + render(row["completion"])]
    return [row["text"]]


def token_lengths(tokenizer: Any, fmt: str, rows: list[dict], batch: int = 1000) -> list[int]:
    """Tokens per row (the longer side of a preference pair), the tokenizer called on batches
    of texts: a fast (Rust) tokenizer encodes a batch in parallel, many times quicker than row
    by row."""
    lengths: list[int] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        texts = [_texts(tokenizer, fmt, r) for r in chunk]
        flat = [t for ts in texts for t in ts]
        ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
        at = 0
        for ts in texts:
            lengths.append(max(len(i) for i in ids[at : at + len(ts)]))
            at += len(ts)
    return lengths


def uniform_sample(n: int, limit: int) -> list[int]:
    """Indices of a uniform sample of `limit` rows out of `n` (all of them when n <= limit)."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit)})


def prompt_tokens(tokenizer: Any, row: dict) -> int:
    """Tokens of a preference row's prompt (explicit, or the shared prefix of both sides)."""
    prompt = row.get("prompt")
    if prompt is None:
        prompt = row["chosen"][: _shared_prefix(row["chosen"], row["rejected"])]
    text = tokenizer.apply_chat_template(prompt, tokenize=False) if isinstance(prompt, list) else prompt
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _empty_turns(row: dict, fmt: str) -> int:
    turns = []
    for col in ("messages", "prompt", "completion", "chosen", "rejected"):
        if isinstance(row.get(col), list):
            turns.extend(row[col])
    return sum(1 for t in turns if not str(t.get("content") or "").strip())


def validate_dataset(
    source: str,
    method: MethodDefinition,
    tokenizer: Any,
    max_length: int,
    out_dir: Path,
    split: str = "train",
    columns: dict[str, str] | None = None,
    conversion: str | None = None,
) -> DatasetReport:
    """Check the data, measure it, and write the canonical rows to ``out_dir/train.jsonl``
    (converted first when the spec names a conversion: the job trains on what was checked)."""
    df = load_frame(source, split)
    if df.empty:
        raise DatasetValidationError(f"{source}: the dataset has no rows")
    given = sample_records(df)
    verdicts = {m: recognise(given, m).text() for m in ("sft", "dpo", "grpo")}
    convert = conversion_for(conversion, method.name) if conversion else None
    df = apply_mapping(df, columns or {}, method, convert)
    if convert is not None:
        converted = convert_rows(df.map(_plain).to_dict(orient="records"), convert, source, method.name)
        df = pd.DataFrame.from_records(converted, index=df.index)
    fmt = detect_format(df, method)
    needed = list(method.formats[fmt])
    dropped = [] if method.keep_extra_columns else [str(c) for c in df.columns if c not in needed]
    kept = needed + ([str(c) for c in df.columns if c not in needed] if method.keep_extra_columns else [])
    df = df[kept].map(_plain)
    try:
        schema_for(fmt).validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        raise DatasetValidationError(_format_failures(e, source, fmt, needed, df)) from None

    records = df.to_dict(orient="records")
    if fmt in ("preference", "implicit_preference"):
        too_long = [i for i, r in zip(df.index, records, strict=True) if prompt_tokens(tokenizer, r) >= max_length]
        if too_long:
            shown = ", ".join(map(str, too_long[:MAX_ROWS_SHOWN]))
            raise DatasetValidationError(
                f"{source}: rows {shown}{' and more' if len(too_long) > MAX_ROWS_SHOWN else ''}: the prompt alone "
                f"fills max_length={max_length} tokens, so nothing of either answer would be trained; shorten the "
                "prompts or raise training.max_length"
            )
    if _needs_chat_template(records) and not getattr(tokenizer, "chat_template", None):
        sft_fix = (
            "set training.chat_template_path (TRL's option) to a model that has one, e.g. "
            "Qwen/Qwen2.5-0.5B-Instruct, or to a .jinja file; "
            if method.name == "sft"
            else "use a model that has one (its -Instruct variant), or "
        )
        raise DatasetValidationError(
            f"{source}: the rows are conversations (lists of turns), but the model's tokenizer has no chat "
            f"template to turn them into text. Fix: {sft_fix}give the data as plain text columns instead "
            f"({', '.join(next(iter(method.formats.values())))} as strings)"
        )
    sample = [records[i] for i in uniform_sample(len(records), MAX_TOKENIZED_ROWS)]
    lengths = token_lengths(tokenizer, fmt, sample)
    canonical = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    duplicates = len(canonical) - len(set(canonical))
    empty_turns = sum(_empty_turns(r, fmt) for r in records)
    over = sum(1 for n in lengths if n > max_length)
    cut = sum(n - max_length for n in lengths if n > max_length)

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
    if empty_turns:
        warnings.append(f"{empty_turns} empty system/tool turn(s)")
    if len(records) > len(sample):
        warnings.append(f"token statistics measured on a uniform sample of {len(sample)} of {len(records)} rows")

    out_dir.mkdir(parents=True, exist_ok=True)
    held = heldout_count(len(records))
    prepared = out_dir / "train.jsonl"
    heldout_path = out_dir / "heldout.jsonl"
    _write_jsonl(records[: len(records) - held], prepared)
    _write_jsonl(records[len(records) - held :], heldout_path)
    if held:
        warnings.append(f"the last {held} row(s) are held out of training to evaluate the exported model")

    ordered = sorted(lengths)
    return DatasetReport(
        source=source,
        split=split,
        format=fmt,  # type: ignore[arg-type]
        rows=len(records),
        columns=needed,
        column_mapping=dict(columns or {}),
        conversion=conversion,
        verdicts=verdicts,
        tokens=TokenStats(
            min=ordered[0],
            max=ordered[-1],
            mean=round(statistics.fmean(ordered), 2),
            p50=ordered[len(ordered) // 2],
            p95=ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        ),
        total_tokens=int(round(statistics.fmean(ordered) * len(records))),
        max_length=max_length,
        rows_over_max_length=over,
        tokens_truncated=cut,
        length_histogram=histogram(ordered, max_length),
        duplicates=duplicates,
        empty_turns=empty_turns,
        warnings=warnings,
        token_counts="estimated" if isinstance(tokenizer, CharEstimateTokenizer) else "measured",
        prepared_path=str(prepared),
        train_rows=len(records) - held,
        heldout_path=str(heldout_path),
    )
